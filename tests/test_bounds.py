"""Canary-audit bounds (attacks.bounds) against independent computations and simulations."""

import math

import numpy as np
import pytest
from scipy import optimize, stats

from attacks.bounds import (
    CanaryBound,
    fdp_one_run_epsilon,
    fdp_rejects,
    gdp_epsilon,
    gdp_mu_lower_bound,
    recompute_epsilon,
)
from attacks.canary_audit import audit_canaries
from attacks.metrics import epsilon_lower_bound, one_run_epsilon_lower_bound


def _gaussian_mechanism_scores(m, mu, rng):
    """m canaries of a mu-GDP mechanism: score ~ N(mu, 1) when included, N(0, 1) when not."""
    included = rng.random(m) < 0.5
    return rng.standard_normal(m) + mu * included, included


def _gdp_delta(eps, mu):
    """delta(eps) of mu-GDP straight from its definition (Dong, Roth, Su 2019, Corollary 2.13)."""
    return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)


def _gdp_epsilon_oracle(mu, delta):
    if _gdp_delta(0.0, mu) <= delta:
        return 0.0
    return optimize.brentq(lambda e: _gdp_delta(e, mu) - delta, 0.0, 200.0, xtol=1e-10)


@pytest.mark.parametrize("mu", [0.1, 0.3, 1.0, 2.5])
def test_gdp_epsilon_matches_the_closed_form(mu):
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(_gdp_epsilon_oracle(mu, 1e-5), rel=1e-8)
    assert gdp_epsilon(0.0, 1e-5) == 0.0


def test_gdp_mu_lower_bound_hand_case():
    fp, n0, fn, p = 50, 1000, 300, 1000
    fpr_u = stats.beta.ppf(0.975, fp + 1, n0 - fp)
    fnr_u = stats.beta.ppf(0.975, fn + 1, p - fn)
    expected = stats.norm.isf(fpr_u) - stats.norm.ppf(fnr_u)
    assert gdp_mu_lower_bound(fp, n0, fn, p, alpha=0.05) == pytest.approx(expected, rel=1e-12)
    assert gdp_mu_lower_bound(500, 1000, 500, 1000) == 0.0  # a coin flip: no evidence
    with pytest.raises(ValueError):
        gdp_mu_lower_bound(5, 4, 0, 10)


def test_fdp_bound_hand_cases():
    assert fdp_one_run_epsilon(1000, 100, 50, delta=1e-5) == 0.0  # half right: nothing
    assert fdp_one_run_epsilon(1000, 100, 0, delta=1e-5) == 0.0
    perfect = fdp_one_run_epsilon(1000, 100, 100, delta=1e-5)
    # the paper's point: at high precision the f-DP analysis is well above Steinke et al.'s
    assert perfect > 1.3 * one_run_epsilon_lower_bound(1000, 100, 100, delta=1e-5)
    # more correct guesses never lower it; a larger beta (less confidence) never lowers it
    values = [fdp_one_run_epsilon(1000, 100, v, delta=1e-5) for v in (70, 80, 90, 100)]
    assert values == sorted(values) and values[0] > 0
    assert fdp_one_run_epsilon(1000, 100, 90, delta=1e-5, beta=0.2) >= values[2]
    with pytest.raises(ValueError):
        fdp_one_run_epsilon(10, 20, 5, delta=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("m, k", [(1000, 100), (5000, 300), (200, 200)])
def test_fdp_recursion_with_the_pure_dp_curve_is_the_binomial_test(eps, m, k):
    """Fed the pure eps-DP trade-off curve, the f-DP recursion must reproduce Steinke et al.'s
    test with delta = 0: reject iff P[Binomial(k, e^eps / (1 + e^eps)) >= v] <= beta (scipy).
    It does to within one correct guess, on the conservative side."""
    beta = 0.05

    def g(x):  # f(1 - x) for f(a) = max(0, 1 - e^eps a, e^-eps (1 - a))
        return max(0.0, 1 - math.exp(eps) * (1 - x), math.exp(-eps) * x)

    first_rejected = next(v for v in range(k + 1) if fdp_rejects(m, k, v, g, beta))
    p = math.exp(eps) / (1 + math.exp(eps))
    binomial = next(v for v in range(k + 1) if stats.binom.sf(v - 1, k, p) <= beta)
    assert binomial <= first_rejected <= binomial + 1
    # and it is a threshold: every larger count is rejected too
    assert all(fdp_rejects(m, k, v, g, beta) for v in range(first_rejected, k + 1))


def test_fdp_bound_is_valid_for_a_gaussian_mechanism():
    """Monte Carlo: on a mu-GDP mechanism the f-DP bound exceeds its true epsilon at most about
    beta of the time (here 200 audits at beta = 0.05: a count above 20 has probability < 1e-3)."""
    mu, delta, beta = 1.0, 1e-5, 0.05
    true_eps = _gdp_epsilon_oracle(mu, delta)
    rng = np.random.default_rng(0)
    over = 0
    for _ in range(200):
        s, inc = _gaussian_mechanism_scores(2000, mu, rng)
        top = np.argsort(-s)[:100]
        over += fdp_one_run_epsilon(2000, 100, int(inc[top].sum()), delta=delta, beta=beta) > true_eps
    assert over <= 20


@pytest.mark.parametrize(
    "m, r, v, delta",
    [(5000, 400, 330, 1e-5), (1000, 100, 70, 1e-5), (20_000, 300, 240, 1e-5), (2000, 200, 150, 0.0)],
)
def test_one_run_bound_against_scipy(m, r, v, delta):
    """The p-value definition of ATTACKS.md, evaluated with scipy: the returned epsilon is
    below the crossing and within the bisection's 1e-6 of it (cases below and above 1, and
    ones where the delta term is a large part of the p-value)."""
    beta = 0.05
    eps = one_run_epsilon_lower_bound(m, r, v, delta=delta, beta=beta)

    def p(e):
        q = math.exp(e) / (1 + math.exp(e))
        tail = stats.binom.sf(v - 1, r, q)
        windows = [
            (stats.binom.cdf(v - 1, r, q) - stats.binom.cdf(v - i - 1, r, q)) / i for i in range(1, v + 1)
        ]
        return tail + 2 * m * delta * max(windows)

    assert 0 < eps and p(eps) < beta <= p(eps + 1.01e-6)


def test_one_run_bound_domain():
    assert one_run_epsilon_lower_bound(1, 1, 1) == 0.0  # one canary: allowed, proves nothing
    for bad in [(0, 0, 0), (10, 20, 5), (10, 5, 6), (10, 5, -1)]:
        with pytest.raises(ValueError, match="need 0 <= correct <= guesses <= canaries"):
            one_run_epsilon_lower_bound(*bad)


def test_null_scores_give_nothing():
    """Scores that carry no information: no bound and no estimate above 0 more often than its
    confidence allows (jax_privacy's PR 270 fixed a GDP epsilon of 3.5-5.9 on null scores)."""
    rng = np.random.default_rng(1)
    positive = {"one-run": 0, "f-dp-one-run": 0, "clopper-pearson": 0, "gdp-estimate": 0}
    runs = 40
    for _ in range(runs):
        s, inc = rng.standard_normal(4000), rng.random(4000) < 0.5
        cs, ci = rng.standard_normal(4000), rng.random(4000) < 0.5
        for b in audit_canaries({"s": s}, inc, delta=1e-5, calibration=({"s": cs}, ci), independent=True):
            positive[b.method] += b.epsilon_lb > 0
    # each is at 95%: P[Binomial(40, 0.05) > 8] < 1e-3
    assert all(count <= 8 for count in positive.values()), positive


def _audit(mu, seed, **kw):
    rng = np.random.default_rng(seed)
    s, inc = _gaussian_mechanism_scores(20_000, mu, rng)
    cs, ci = _gaussian_mechanism_scores(20_000, mu, rng)
    return (
        s,
        inc,
        audit_canaries({"s": s}, inc, delta=1e-5, calibration=({"s": cs}, ci), independent=True, **kw),
    )


def test_bounds_agree_with_their_counts_and_recompute():
    s, inc, bounds = _audit(2.0, 2)
    by = {b.method: b for b in bounds}
    assert set(by) == {"one-run", "f-dp-one-run", "clopper-pearson", "gdp-estimate"}
    cp = by["clopper-pearson"]
    c = cp.counts
    t = cp.extra["threshold"]
    assert c["fp"] == int(((s >= t) & ~inc).sum()) and c["fn"] == int(((s < t) & inc).sum())
    assert cp.epsilon_lb == epsilon_lower_bound(c["fp"], c["negatives"], c["fn"], c["positives"], delta=1e-5)
    one = by["one-run"].counts
    assert by["one-run"].epsilon_lb == one_run_epsilon_lower_bound(
        one["canaries"], one["guesses"], one["correct"], delta=1e-5, beta=0.05
    )
    for b in bounds:
        assert recompute_epsilon(b.to_json(), 0.95) == pytest.approx(b.epsilon_lb, abs=1e-6)
        assert recompute_epsilon(b.to_json(), 0.999) <= b.epsilon_lb + 1e-9  # more confidence, lower bound
    # the valid ones are below the truth; mu = 2 is about epsilon 6.4 at delta 1e-5
    truth = _gdp_epsilon_oracle(2.0, 1e-5)
    assert 0 < by["one-run"].epsilon_lb < truth and 0 < cp.epsilon_lb < truth
    assert by["one-run"].valid and cp.valid and not by["gdp-estimate"].valid and not by["f-dp-one-run"].valid
    # the GDP estimate is close to the truth on a truly Gaussian mechanism
    assert by["gdp-estimate"].epsilon_lb == pytest.approx(truth, rel=0.2)


def test_choices_never_look_at_the_audited_labels():
    """Shuffling the audited canaries' labels changes the counts, never what was chosen."""
    rng = np.random.default_rng(3)
    s, inc = _gaussian_mechanism_scores(5000, 1.5, rng)
    cs, ci = _gaussian_mechanism_scores(5000, 1.5, rng)
    scores = {"a": s, "b": -s + rng.normal(0, 0.1, len(s))}
    cal = ({"a": cs, "b": -cs + rng.normal(0, 0.1, len(cs))}, ci)
    first = audit_canaries(scores, inc, delta=1e-5, calibration=cal, independent=True)
    shuffled = audit_canaries(scores, rng.permutation(inc), delta=1e-5, calibration=cal, independent=True)
    for a, b in zip(first, shuffled, strict=True):
        assert (a.score, a.extra.get("threshold"), a.counts.get("guessed_in")) == (
            b.score,
            b.extra.get("threshold"),
            b.counts.get("guessed_in"),
        )
    assert first[0].score == "a"  # the informative score is the one chosen on calibration


def test_without_calibration_the_confidence_is_split_and_clopper_pearson_needs_independence():
    rng = np.random.default_rng(4)
    s, inc = _gaussian_mechanism_scores(4000, 2.0, rng)
    bounds = audit_canaries({"s": s}, inc, delta=1e-5)
    methods = [b.method for b in bounds]
    assert "clopper-pearson" not in methods  # not independent trials unless said so
    one = next(b for b in bounds if b.method == "one-run")
    assert one.tests > 1 and "Bonferroni" in one.selection
    c = one.counts
    assert one.epsilon_lb == one_run_epsilon_lower_bound(
        c["canaries"], c["guesses"], c["correct"], delta=1e-5, beta=0.05 / one.tests
    )
    assert one.ceiling >= one.epsilon_lb and isinstance(one, CanaryBound)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(delta=0.0), "delta"),
        (dict(delta=1e-5, confidence=1.0), "confidence"),
        (dict(delta=1e-5, confidence=0.5), "confidence"),
        (dict(delta=1e-5, methods=("nope",)), "unknown bound method"),
    ],
)
def test_bad_audit_input(kwargs, message):
    s, inc = np.arange(10.0), np.arange(10) % 2 == 0
    with pytest.raises(ValueError, match=message):
        audit_canaries({"s": s}, inc, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        audit_canaries({"s": np.r_[s[:-1], np.nan]}, inc, delta=1e-5)
    with pytest.raises(ValueError, match="included and excluded"):
        audit_canaries({"s": s}, np.ones(10, bool), delta=1e-5)
    with pytest.raises(ValueError, match="boolean"):  # 0/1 is accepted, 2 is not
        audit_canaries({"s": s}, np.arange(10) % 3, delta=1e-5)
    assert audit_canaries({"s": s}, np.arange(10) % 2, delta=1e-5)


def test_recompute_splits_the_confidence_over_the_tests_and_uses_the_bounds_delta():
    """The gate recomputes each bound at its own confidence: the Bonferroni split over the
    bound's ``tests`` and its ``delta`` both matter (mutation testing found them unchecked)."""
    _, _, bounds = _audit(2.0, 2)
    for b in bounds:
        j = b.to_json()
        c = j["counts"]
        for tests, delta in ((1, 1e-5), (4, 1e-5), (4, 1e-3)):
            beta = 0.05 / tests
            if b.method == "one-run":
                want = one_run_epsilon_lower_bound(
                    c["canaries"], c["guesses"], c["correct"], delta=delta, beta=beta
                )
            elif b.method == "f-dp-one-run":
                want = fdp_one_run_epsilon(c["canaries"], c["guesses"], c["correct"], delta=delta, beta=beta)
            elif b.method == "clopper-pearson":
                want = epsilon_lower_bound(
                    c["fp"], c["negatives"], c["fn"], c["positives"], delta=delta, alpha=beta
                )
            else:
                mu = gdp_mu_lower_bound(c["fp"], c["negatives"], c["fn"], c["positives"], alpha=beta)
                want = gdp_epsilon(mu, delta)
            assert recompute_epsilon({**j, "tests": tests, "delta": delta}, 0.95) == pytest.approx(
                want, abs=1e-9
            )
        one, four = (recompute_epsilon({**j, "tests": t, "delta": 1e-5}, 0.95) for t in (1, 4))
        assert 0 < four < one, (b.method, one, four)  # a split confidence gives a lower bound
        loose = recompute_epsilon({**j, "tests": 1, "delta": 1e-2}, 0.95)
        assert loose < one, (b.method, loose, one)  # a larger delta explains more: a lower epsilon
    with pytest.raises(ValueError, match="unknown bound method"):
        recompute_epsilon({**bounds[0].to_json(), "method": "guess"}, 0.95)


# ---- the vectorised selection criteria against their scalar oracles (mutation testing) ----


@pytest.mark.parametrize("delta,alpha", [(1e-5, 0.05), (0.01, 0.2), (0.0, 0.01)])
def test_vectorised_criteria_equal_the_scalar_bounds_at_every_count(delta, alpha):
    """``_cp_vector`` / ``_gdp_mu_vector`` choose thresholds; each entry must equal the scalar
    ``epsilon_lower_bound`` / ``gdp_mu_lower_bound`` at its counts, edges included (no errors,
    every trial an error)."""
    from attacks.bounds import gdp_mu_lower_bound
    from attacks.canary_audit import _cp_vector, _gdp_mu_vector

    for n0, p in [(40, 25), (7, 300), (1, 300), (300, 1), (1, 1)]:
        fp, fn = np.meshgrid(np.arange(n0 + 1), np.arange(p + 1), indexing="ij")
        fp, fn = fp.ravel(), fn.ravel()
        eps = _cp_vector(fp, n0, fn, p, delta, alpha)
        mu = _gdp_mu_vector(fp, n0, fn, p, alpha)
        for i in range(len(fp)):
            want = epsilon_lower_bound(int(fp[i]), n0, int(fn[i]), p, delta=delta, alpha=alpha)
            assert eps[i] == pytest.approx(want, rel=1e-9, abs=1e-12), (fp[i], fn[i])
            want_mu = gdp_mu_lower_bound(int(fp[i]), n0, int(fn[i]), p, alpha=alpha)
            assert mu[i] == pytest.approx(want_mu, rel=1e-9, abs=1e-12), (fp[i], fn[i])
        if min(n0, p) > 1:
            assert eps.max() > 0 and mu.max() > 0  # the grid reaches positive bounds


def test_threshold_counts_equal_counting_each_threshold():
    from attacks.canary_audit import _threshold_candidates, _threshold_counts

    rng = np.random.default_rng(3)
    s = np.round(rng.normal(size=300), 1)  # ties
    inc = rng.random(300) < 0.4
    t = _threshold_candidates(s)
    assert np.array_equal(t, np.unique(s))
    fp, n0, fn, p = _threshold_counts(s, inc, t)
    assert (n0, p) == (int((~inc).sum()), int(inc.sum()))
    for i, th in enumerate(t):
        guess = s >= th
        assert fp[i] == int((guess & ~inc).sum()) and fn[i] == int((~guess & inc).sum())


def test_threshold_candidates_keep_both_tails_and_thin_the_middle():
    from attacks.canary_audit import THRESHOLD_CANDIDATES, _threshold_candidates

    s = np.arange(5 * THRESHOLD_CANDIDATES, dtype=float)
    t = _threshold_candidates(s)
    tail = THRESHOLD_CANDIDATES // 4
    assert len(t) <= THRESHOLD_CANDIDATES
    assert np.array_equal(t[:tail], s[:tail]) and np.array_equal(t[-tail:], s[-tail:])
    assert t[tail + 1] > s[tail + 1] and t[-tail - 2] < s[-tail - 2]  # thinned right after each tail
    assert np.all(np.diff(t) > 0) and t[0] == s.min() and t[-1] == s.max()
    assert len(t) > THRESHOLD_CANDIDATES - 5  # the middle is thinned, not dropped


def test_a_bound_writes_every_field_it_is_read_back_by():
    from attacks.bounds import CanaryBound

    b = CanaryBound(
        method="one-run",
        epsilon_lb=1.25,
        confidence=0.9,
        delta=1e-6,
        valid=False,
        assumptions="a",
        selection="s",
        score="llr",
        counts={"canaries": 10, "guesses": 4},
        tests=3,
        ceiling=2.5,
        extra={"mu": 0.7},
    )
    assert b.to_json() == {
        "method": "one-run",
        "epsilon_lb": 1.25,
        "confidence": 0.9,
        "delta": 1e-6,
        "valid": False,
        "assumptions": "a",
        "selection": "s",
        "score": "llr",
        "counts": {"canaries": 10, "guesses": 4},
        "tests": 3,
        "ceiling": 2.5,
        "saturated": False,
        "extra": {"mu": 0.7},
    }
    at_ceiling = CanaryBound(
        method="clopper-pearson",
        epsilon_lb=2.5,
        confidence=0.95,
        delta=1e-5,
        valid=True,
        assumptions="",
        selection="",
        score="",
        counts={},
        ceiling=2.5,
    )
    j = at_ceiling.to_json()
    assert j["saturated"] is True and "extra" not in j and j["tests"] == 1
    assert CanaryBound(**{**at_ceiling.__dict__, "ceiling": None}).to_json()["saturated"] is False
    assert CanaryBound(**{**at_ceiling.__dict__, "epsilon_lb": 2.5 - 1e-6}).saturated is False


def _naive_best_plan_bound(method, scores, inc, delta, beta):
    """Every (score, plan) evaluated, nothing pruned: the oracle of ``_calibrated_guesses``."""
    from attacks.canary_audit import _guess_bound, _guess_counts, _guess_plans, _plan_counts, _ranking

    m, best = len(inc), 0.0
    for s in scores.values():
        order = _ranking(s)
        for f_in, f_out in _guess_plans(method, m):
            r, v = _guess_counts(order, inc, *_plan_counts(f_in, f_out, m))
            best = max(best, _guess_bound(method, m, r, v, delta, beta, coarse=True))
    return best


@pytest.mark.parametrize("method", ["one-run", "f-dp-one-run"])
def test_calibrated_guess_plan_is_the_best_of_every_plan_despite_the_shortcuts(method):
    """``_calibrated_guesses`` skips plans that cannot win (coin-level precision, a precision
    whose logit is below the best so far); the plan it returns must still carry the largest
    bound of all plans. The first case has a coin-level plan (1 of the top 2) between a
    useless one (the top 1) and good ones, so a search that stopped at it would lose them."""
    from attacks.canary_audit import _calibrated_guesses, _guess_bound, _guess_counts, _plan_counts, _ranking

    m = 1000
    crafted = np.zeros(m, dtype=bool)
    crafted[[0, *range(2, 150)]] = True  # ranked by position: IN, OUT, then 148 IN
    crafted_scores = -np.arange(m, dtype=float)
    rng = np.random.default_rng(5)
    g_scores, g_inc = _gaussian_mechanism_scores(m, 2.0, rng)
    cases = [
        ({"s": crafted_scores}, crafted),
        ({"noise": rng.standard_normal(m), "s": g_scores}, g_inc),  # the second score is the good one
    ]
    # few canaries: each plan's count rounds visibly, so a plan must be valued at the true count
    small = [_gaussian_mechanism_scores(25, 2.0, rng) for _ in range(30)]
    cases += [({"s": s}, inc) for s, inc in small if 0 < inc.sum() < 25]
    for scores, inc in cases:
        name, f_in, f_out = _calibrated_guesses(method, scores, inc, 1e-5, 0.05)
        r, v = _guess_counts(_ranking(scores[name]), inc, *_plan_counts(f_in, f_out, len(inc)))
        chosen = _guess_bound(method, len(inc), r, v, 1e-5, 0.05, coarse=True)
        assert chosen == _naive_best_plan_bound(method, scores, inc, 1e-5, 0.05)
        assert chosen > 0 or len(inc) == 25
        if method == "f-dp-one-run":
            assert f_out == 0.0  # its analysis is for IN guesses only


def test_the_calibrated_score_is_the_one_audited_and_the_counts_and_ceiling_are_its_own():
    """The score chosen on calibration canaries is the one applied to the audited canaries,
    even when it is not the first offered; the reported guess counts recount to the reported
    guesses and correct guesses, and the ceiling is the bound with every guess correct."""
    from attacks.canary_audit import _guess_counts, _ranking

    rng = np.random.default_rng(6)
    s, inc = _gaussian_mechanism_scores(4000, 1.5, rng)
    cs, ci = _gaussian_mechanism_scores(4000, 1.5, rng)
    scores = {"noise": rng.standard_normal(4000), "s": s}
    cal = ({"noise": rng.standard_normal(4000), "s": cs}, ci)
    by = {b.method: b for b in audit_canaries(scores, inc, delta=1e-5, calibration=cal, independent=True)}
    for method in ("one-run", "f-dp-one-run"):
        b = by[method]
        c = b.counts
        assert b.score == "s" and b.tests == 1 and c["guessed_in"] != c["guessed_out"]
        assert _guess_counts(_ranking(scores["s"]), inc, c["guessed_in"], c["guessed_out"]) == (
            c["guesses"],
            c["correct"],
        )
        bound = one_run_epsilon_lower_bound if method == "one-run" else fdp_one_run_epsilon
        assert b.ceiling == bound(c["canaries"], c["guesses"], c["guesses"], delta=1e-5, beta=0.05)
    for method in ("clopper-pearson", "gdp-estimate"):
        assert by[method].score == "s"


def test_without_calibration_the_fixed_plans_are_the_documented_ones():
    from attacks.canary_audit import BONFERRONI_PLANS, _guess_counts, _plan_counts, _ranking

    rng = np.random.default_rng(7)
    s, inc = _gaussian_mechanism_scores(3000, 1.0, rng)
    one = next(b for b in audit_canaries({"s": s}, inc, delta=1e-5) if b.method == "one-run")
    assert one.tests == len(BONFERRONI_PLANS)
    c = one.counts
    assert (c["guessed_in"], c["guessed_out"]) in [_plan_counts(f, o, 3000) for f, o in BONFERRONI_PLANS]
    assert c["guessed_in"] != c["guessed_out"]  # so a swap of the two would show
    assert _guess_counts(_ranking(s), inc, c["guessed_in"], c["guessed_out"]) == (c["guesses"], c["correct"])
    assert one.ceiling == one_run_epsilon_lower_bound(
        3000, c["guesses"], c["guesses"], delta=1e-5, beta=0.05 / one.tests
    )
    best = max(
        one_run_epsilon_lower_bound(
            3000,
            *_guess_counts(_ranking(s), inc, *_plan_counts(f, o, 3000)),
            delta=1e-5,
            beta=0.05 / one.tests,
        )
        for f, o in BONFERRONI_PLANS
    )
    assert one.epsilon_lb == best > 0


def _naive_threshold_criterion(s, inc, t, criterion, delta, alpha):
    """The selection criterion at one threshold, from counting and the scalar bounds."""
    from attacks.canary_audit import SELECTION_STRICTNESS

    guess = s >= t
    fp, n0, fn, p = int((guess & ~inc).sum()), int((~inc).sum()), int((~guess & inc).sum()), int(inc.sum())
    a = alpha * SELECTION_STRICTNESS
    if criterion == "clopper-pearson":
        return epsilon_lower_bound(fp, n0, fn, p, delta=delta, alpha=a)
    return gdp_mu_lower_bound(fp, n0, fn, p, alpha=a)


def _check_threshold_bound(b, s_eval, inc_eval, s_sel, inc_sel, delta=1e-5, beta=0.05):
    """A threshold bound against counting: its threshold maximises the criterion on the
    selection canaries, its counts are those of "IN iff score >= threshold" on the evaluated
    canaries, and its epsilon, ceiling and mu are the scalar bounds of those counts."""
    t = b.extra["threshold"]
    values = [_naive_threshold_criterion(s_sel, inc_sel, u, b.method, delta, beta) for u in np.unique(s_sel)]
    assert _naive_threshold_criterion(s_sel, inc_sel, t, b.method, delta, beta) == pytest.approx(
        max(values), rel=1e-9
    )
    guess = s_eval >= t
    fp, fn = int((guess & ~inc_eval).sum()), int((~guess & inc_eval).sum())
    n0, p = int((~inc_eval).sum()), int(inc_eval.sum())
    assert b.counts == {"fp": fp, "negatives": n0, "fn": fn, "positives": p}
    if b.method == "clopper-pearson":
        assert b.epsilon_lb == epsilon_lower_bound(fp, n0, fn, p, delta=delta, alpha=beta)
        assert b.ceiling == epsilon_lower_bound(0, n0, 0, p, delta=delta, alpha=beta)
    else:
        mu = gdp_mu_lower_bound(fp, n0, fn, p, alpha=beta)
        assert b.extra["mu_lb"] == mu and b.epsilon_lb == gdp_epsilon(mu, delta) and b.ceiling is None


@pytest.mark.parametrize("seed, rounded", [(8, True), (11, False)])
def test_threshold_bounds_against_counting_with_calibration(seed, rounded):
    """Rounded to one decimal, audited scores tie with the threshold (``>=`` counts); the
    continuous case (seed 11) is one where the plain criterion (alpha, not alpha times
    SELECTION_STRICTNESS) would choose other thresholds for both methods."""
    rng = np.random.default_rng(seed)
    s, inc = _gaussian_mechanism_scores(1501, 1.5, rng)
    cs, ci = _gaussian_mechanism_scores(1501, 1.5, rng)
    if rounded:
        s, cs = np.round(s, 1), np.round(cs, 1)
    bounds = audit_canaries({"s": s}, inc, delta=1e-5, calibration=({"s": cs}, ci), independent=True)
    checked = [b for b in bounds if b.method in ("clopper-pearson", "gdp-estimate")]
    assert len(checked) == 2
    for b in checked:
        assert np.isin(b.extra["threshold"], s) or not rounded  # a tie with audited scores exists
        _check_threshold_bound(b, s, inc, cs, ci)


def test_threshold_bounds_against_counting_without_calibration():
    """The threshold is chosen on a fixed half of each class (an odd count of each, so the
    halves differ in size) and evaluated on the other half only."""
    from attacks.metrics import stratified_half

    rng = np.random.default_rng(9)
    inc = np.zeros(2001, dtype=bool)
    inc[rng.permutation(2001)[:999]] = True  # 999 included, 1002 excluded
    s = np.round(rng.standard_normal(2001) + 1.5 * inc, 1)
    pick = stratified_half(inc, 0)
    assert (pick & inc).sum() == 999 // 2 and (pick & ~inc).sum() == 1002 // 2
    bounds = audit_canaries({"s": s}, inc, delta=1e-5, independent=True)
    assert [b.to_json() for b in bounds] == [
        b.to_json() for b in audit_canaries({"s": s}, inc, delta=1e-5, independent=True)
    ]
    checked = [b for b in bounds if b.method in ("clopper-pearson", "gdp-estimate")]
    assert len(checked) == 2
    for b in checked:
        _check_threshold_bound(b, s[~pick], inc[~pick], s[pick], inc[pick])


def test_null_scores_give_nothing_without_calibration_either():
    """Without calibration the threshold is chosen on one half and evaluated on the other; a
    threshold evaluated where it was chosen would find leakage in pure noise."""
    rng = np.random.default_rng(10)
    positive = {"one-run": 0, "f-dp-one-run": 0, "clopper-pearson": 0, "gdp-estimate": 0}
    for _ in range(40):
        s, inc = rng.standard_normal(2000), rng.random(2000) < 0.5
        for b in audit_canaries({"s": s}, inc, delta=1e-5, independent=True):
            positive[b.method] += b.epsilon_lb > 0
    assert all(count <= 8 for count in positive.values()), positive


def test_guess_plan_helpers_follow_their_documentation():
    """The small helpers behind every guess plan, at their edges: counts round to nearest (at
    least one guess), IN and OUT guesses never share a canary, two-sided plans go up to a
    quarter each side, f-DP keeps one-sided plans up to FDP_MAX_GUESSES guesses inclusive, and
    ties in the ranking keep the canaries' order."""
    from attacks.canary_audit import FDP_MAX_GUESSES, _guess_plans, _plan_counts, _ranking

    assert _plan_counts(0.005, 0.0, 300) == (2, 0)  # 1.5 rounds to 2
    assert _plan_counts(0.001, 0.0, 300) == (1, 0)  # 0.3 rounds to 0, raised to one guess
    assert _plan_counts(0.5, 0.5, 3) == (2, 1)  # 2 + 2 would guess a canary twice
    assert _plan_counts(0.2, 0.2, 10) == (2, 2)
    plans = _guess_plans("one-run", 1000, fractions=(0.1, 0.25, 0.3))
    assert plans == [(0.1, 0.0), (0.25, 0.0), (0.3, 0.0), (0.1, 0.1), (0.25, 0.25)]
    assert _guess_plans("one-run", 1000, plans=[(0.3, 0.3)]) == [(0.3, 0.3)]
    at_cap = 2 * FDP_MAX_GUESSES
    assert _guess_plans("f-dp-one-run", at_cap, fractions=(0.5, 0.6)) == [(0.5, 0.0)]
    assert _guess_plans("f-dp-one-run", 1000, plans=[(0.2, 0.2), (0.2, 0.0)]) == [(0.2, 0.0)]
    s = np.zeros(100)
    s[::3] = 1.0
    assert list(_ranking(s)) == list(range(0, 100, 3)) + [i for i in range(100) if i % 3]


def test_gaussian_tradeoff_is_the_gdp_curve_reflected():
    """g(x) = f_mu(1 - x) = Phi(Phi^-1(x) - mu) (scipy), 0 and 1 at the ends, the identity
    (no privacy spent) at mu = 0."""
    from attacks.bounds import gaussian_tradeoff

    for mu in (0.3, 0.8, 1.0, 2.5):
        g = gaussian_tradeoff(mu)
        for x in (1e-6, 0.01, 0.3, 0.5, 0.99):
            assert g(x) == pytest.approx(stats.norm.cdf(stats.norm.ppf(x) - mu), rel=1e-9)
        assert (g(0.0), g(1.0)) == (0.0, 1.0)
    assert [gaussian_tradeoff(0.0)(x) for x in (0.0, 0.3, 1.0)] == [0.0, 0.3, 1.0]


def _fdp_rejects_naive(m, k, v, g, beta):
    """The recursion of ``fdp_rejects`` run to the end, without its early exit."""
    if v == 0:
        return False
    r, h = beta * v / m, beta * (k - v) / m
    for i in range(v - 1, -1, -1):
        g_r = 1.0 if r >= 1.0 else g(r)
        if g_r > h:
            r = min(r + (i / (k - i)) * (g_r - h), 1.0)
            h = g_r
    return r + h > k / m


def test_fdp_rejects_equals_the_recursion_run_to_the_end():
    """The early exit (once g(r) <= h nothing changes) must not change any outcome."""
    from attacks.bounds import gaussian_tradeoff

    rng = np.random.default_rng(13)
    seen = set()
    for _ in range(300):
        m = int(rng.integers(20, 3000))
        k = int(rng.integers(1, min(m, 300) + 1))
        v = int(rng.integers(0, k + 1))
        mu, beta = float(rng.uniform(0, 3)), float(rng.choice([0.05, 0.2]))
        g = gaussian_tradeoff(mu)
        got = fdp_rejects(m, k, v, g, beta)
        assert got == _fdp_rejects_naive(m, k, v, g, beta), (m, k, v, mu, beta)
        seen.add(got)
    assert seen == {True, False}
    # every guess correct: the steps at i = 1 and i = 0 decide these (found by search)
    for m, k, mu, beta in [(3, 2, 0.202, 0.5), (10, 4, 0.383, 0.2), (4, 3, 0.93, 0.5), (65, 2, 0.301, 0.5)]:
        g = gaussian_tradeoff(mu)
        assert fdp_rejects(m, k, k, g, beta) is True and _fdp_rejects_naive(m, k, k, g, beta) is True


@pytest.mark.parametrize("m, k, v", [(1000, 100, 100), (2000, 200, 150), (5000, 300, 260)])
def test_fdp_mu_is_the_rejection_boundary_to_its_tolerance(m, k, v):
    from attacks.bounds import _fdp_falsified, fdp_mu_lower_bound

    mu = fdp_mu_lower_bound(m, k, v)
    assert mu > 0 and _fdp_falsified(m, k, v, mu, 0.05)
    assert not _fdp_falsified(m, k, v, mu * (1 + 1.001e-4), 0.05)
    assert fdp_one_run_epsilon(m, k, v, delta=1e-5) == gdp_epsilon(mu, 1e-5)


def test_fdp_bound_domain():
    assert fdp_one_run_epsilon(1, 1, 1, delta=1e-5) == 0.0
    assert fdp_one_run_epsilon(100, 100, 100, delta=1e-5) > 0  # every canary guessed
    for bad in [(0, 0, 0), (10, 20, 5), (10, 5, 6), (10, 5, -1)]:
        with pytest.raises(ValueError, match="need 0 <= correct <= guesses <= canaries"):
            fdp_one_run_epsilon(*bad, delta=1e-5)
    for delta in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"delta must be in \(0, 1\)"):
            fdp_one_run_epsilon(100, 10, 10, delta=delta)
