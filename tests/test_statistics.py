"""Margins and Welch's test, checked against independent computations (scipy, closed forms)."""
import numpy as np
import scipy.special
import scipy.stats

import viz


def test_margin_matches_definition():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(5, 7, 10)).astype(np.float16)
    labels = rng.integers(0, 10, size=7)
    got = viz.margins(logits, labels)
    assert got.dtype == np.float32
    for r in range(5):
        for e in range(7):
            row = logits[r, e].astype(np.float64)
            others = np.delete(row, labels[e])
            expected = row[labels[e]] - scipy.special.logsumexp(others)
            assert abs(got[r, e] - expected) < 1e-5


def test_margin_is_stable_for_large_logits():
    logits = np.zeros((1, 1, 10), np.float16)  # as stored
    logits[0, 0, 3] = 60000.0  # near float16's limit (65504); a naive exp would overflow
    logits[0, 0, 4] = 59968.0  # float16's spacing here is 32: the next value below 60000
    assert logits[0, 0, 4] == 59968.0
    assert viz.margins(logits, [3])[0, 0] == np.float32(32.0) - np.log1p(8 * np.exp(-59968.0))


def test_welch_matches_scipy():
    rng = np.random.default_rng(1)
    a = rng.normal(1.0, 1.0, size=(30, 6))
    b = rng.normal(0.7, 2.0, size=(17, 6))
    got = viz.welch(a, b)
    t, p = scipy.stats.ttest_ind(a, b, equal_var=False, axis=0)
    np.testing.assert_allclose(got['t'], t, rtol=1e-10)
    np.testing.assert_allclose(got['p'], p, rtol=1e-8)
    np.testing.assert_allclose(got['diff'], a.mean(0) - b.mean(0), rtol=1e-12)
    # The Welch-Satterthwaite degrees of freedom, written out
    va, vb = a.var(0, ddof=1) / 30, b.var(0, ddof=1) / 17
    np.testing.assert_allclose(got['df'], (va + vb) ** 2 / (va ** 2 / 29 + vb ** 2 / 16))


def test_welch_constant_margins():
    same = viz.welch(np.full((4, 1), 2.0), np.full((5, 1), 2.0))
    assert same['p'][0] == 1.0 and same['diff'][0] == 0.0
    apart = viz.welch(np.full((4, 1), 3.0), np.full((5, 1), 2.0))
    assert apart['p'][0] == 0.0 and apart['diff'][0] == 1.0


def test_welch_ignores_nan_and_needs_two_runs():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(10, 2))
    b = rng.normal(size=(8, 2))
    a_nan = a.copy()
    a_nan[3, 0] = np.nan
    got = viz.welch(a_nan, b)
    expected = scipy.stats.ttest_ind(np.delete(a[:, 0], 3), b[:, 0], equal_var=False)
    assert got['n_a'][0] == 9 and got['n_a'][1] == 10
    np.testing.assert_allclose(got['p'][0], expected.pvalue, rtol=1e-8)
    one_run = viz.welch(a[:1], b)
    assert np.isnan(one_run['p']).all()
    assert np.allclose(one_run['diff'], a[0] - b.mean(0))


# -----------------------------------------------------------------------------
# Intervals, multiple testing, permutation test and power

def test_welch_ci_matches_scipy_and_closed_form():
    rng = np.random.default_rng(3)
    a = rng.normal(0.5, 1.0, size=(25, 5))
    b = rng.normal(0.0, 3.0, size=(12, 5))
    got = viz.welch(a, b)
    for j in range(5):
        ci = scipy.stats.ttest_ind(a[:, j], b[:, j], equal_var=False).confidence_interval(0.95)
        np.testing.assert_allclose([got['ci_low'][j], got['ci_high'][j]], [ci.low, ci.high],
                                   rtol=1e-10)
    # another level, written out: diff +- t_{0.95, df} * se with Welch-Satterthwaite df
    va, vb = a.var(0, ddof=1) / 25, b.var(0, ddof=1) / 12
    df = (va + vb) ** 2 / (va ** 2 / 24 + vb ** 2 / 11)
    half = scipy.stats.t.ppf(0.95, df) * np.sqrt(va + vb)
    got90 = viz.welch(a, b, level=0.90)
    np.testing.assert_allclose(got90['ci_high'], a.mean(0) - b.mean(0) + half, rtol=1e-10)
    np.testing.assert_allclose(got90['ci_low'], a.mean(0) - b.mean(0) - half, rtol=1e-10)


def test_welch_ci_covers_a_planted_difference_95_percent_of_the_time():
    rng = np.random.default_rng(4)
    reps = 4000  # one column per replication; unequal sizes and variances
    a = rng.normal(1.3, 0.5, size=(8, reps))
    b = rng.normal(1.0, 2.0, size=(30, reps))
    got = viz.welch(a, b)
    covered = ((got['ci_low'] <= 0.3) & (0.3 <= got['ci_high'])).mean()
    assert abs(covered - 0.95) < 3 * np.sqrt(0.95 * 0.05 / reps) + 0.005


def test_welch_ci_degenerate_and_missing():
    got = viz.welch(np.full((3, 1), 2.0), np.full((4, 1), 1.5))
    assert got['ci_low'][0] == got['ci_high'][0] == 0.5
    got = viz.welch(np.ones((1, 2)), np.zeros((5, 2)))
    assert np.isnan(got['ci_low']).all() and np.isnan(got['ci_high']).all()


def test_bh_matches_scipy():
    rng = np.random.default_rng(5)
    p = np.concatenate([rng.uniform(size=30), rng.uniform(0, 0.002, size=10)])
    p[[3, 7]] = p[11]  # ties
    np.testing.assert_allclose(viz.bh_qvalues(p),
                               scipy.stats.false_discovery_control(p, method='bh'), rtol=1e-12)
    with_nan = np.insert(p, [0, 20], np.nan)  # examples without a test count in no m
    q = viz.bh_qvalues(with_nan)
    assert np.isnan(q[[0, 21]]).all()
    np.testing.assert_allclose(np.delete(q, [0, 21]),
                               scipy.stats.false_discovery_control(p, method='bh'), rtol=1e-12)


def test_bh_q_below_alpha_is_the_step_up_selection():
    rng = np.random.default_rng(6)
    p = np.concatenate([rng.uniform(size=25), rng.uniform(0, 0.01, size=15)])
    q = viz.bh_qvalues(p)
    m = len(p)
    for alpha in (0.001, 0.01, 0.05, 0.1, 0.3):
        ranked = np.sort(p)
        passing = [k for k in range(1, m + 1) if ranked[k - 1] <= k * alpha / m]
        cutoff = ranked[max(passing) - 1] if passing else -1.0
        assert set(np.flatnonzero(p <= cutoff)) == set(np.flatnonzero(q <= alpha))


def test_holm_matches_hand_loop():
    rng = np.random.default_rng(7)
    p = np.concatenate([rng.uniform(size=30), rng.uniform(0, 1e-3, size=10), [np.nan]])
    got = viz.holm(p)
    finite = p[:-1]
    m = len(finite)
    order = sorted(range(m), key=lambda i: finite[i])
    expected, running = np.empty(m), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * finite[i]))
        expected[i] = running
    np.testing.assert_allclose(got[:-1], expected, rtol=1e-12)
    assert np.isnan(got[-1])
    for alpha in (0.001, 0.01, 0.05, 0.2):  # the step-down procedure, run as a loop
        rejected = set()
        for rank, i in enumerate(order):
            if finite[i] > alpha / (m - rank):
                break
            rejected.add(i)
        assert rejected == set(np.flatnonzero(got[:-1] <= alpha))


def test_permutation_matches_exact_enumeration():
    """4 + 4 runs have 70 labellings: the Monte Carlo p-value must approach the exact one.
    A nan in one column drops that run from that column only, as in Welch's test."""
    import itertools
    rng = np.random.default_rng(8)
    a = rng.normal(1.0, 1.0, size=(4, 3))
    b = rng.normal(0.0, 1.0, size=(4, 3))
    a[1, 2] = np.nan
    x = np.concatenate([a, b])
    exact = []
    for j in range(3):
        t_obs = abs(scipy.stats.ttest_ind(a[:, j], b[:, j], equal_var=False,
                                          nan_policy='omit').statistic)
        hits = 0
        splits = list(itertools.combinations(range(8), 4))
        for chosen in splits:
            rest = [r for r in range(8) if r not in chosen]
            t = scipy.stats.ttest_ind(x[list(chosen), j], x[rest, j], equal_var=False,
                                      nan_policy='omit').statistic
            hits += bool(abs(t) >= t_obs * (1 - 1e-9))
        exact.append(hits / len(splits))
    k = 20000
    got = viz.permutation_pvalues(a, b, k, seed=1)
    np.testing.assert_allclose(got, exact, atol=4 * np.sqrt(0.25 / k) + 1 / k)


def test_permutation_approximates_welch_on_normal_data():
    rng = np.random.default_rng(9)
    effects = np.linspace(0, 0.5, 12)
    a = rng.normal(effects, 1.0, size=(150, 12))
    b = rng.normal(0.0, 1.3, size=(150, 12))
    k = 4000
    got = viz.permutation_pvalues(a, b, k, seed=2)
    welch_p = scipy.stats.ttest_ind(a, b, equal_var=False).pvalue
    tolerance = 0.01 + 4 * np.sqrt(welch_p * (1 - welch_p) / k) + 1 / k
    assert (np.abs(got - welch_p) <= tolerance).all(), (got, welch_p)


def test_permutation_is_seeded_and_bounded():
    rng = np.random.default_rng(10)
    a = rng.normal(5.0, 1.0, size=(30, 2))
    b = rng.normal(0.0, 1.0, size=(30, 2))
    b[:, 1] = a[:, 1]  # identical arms: |t| = 0, every shuffle is at least as extreme
    first = viz.permutation_pvalues(a, b, 999, seed=3)
    assert np.array_equal(first, viz.permutation_pvalues(a, b, 999, seed=3))
    assert first[0] == 1 / 1000  # no shuffle reaches an effect of 5 sd: p = (0 + 1) / (999 + 1)
    assert first[1] == 1.0
    assert np.isnan(viz.permutation_pvalues(a[:1], b, 10)).all()  # 1 run: no test


def power_by_hand(n, d, va, vb, alpha):
    """Power of the two-sided Welch test, from the noncentral t, one n at a time."""
    df = (n - 1) * (va + vb) ** 2 / (va ** 2 + vb ** 2)
    delta = d / np.sqrt(va / n + vb / n)
    crit = scipy.stats.t.isf(alpha / 2, df)
    return 1 - scipy.stats.nct.cdf(crit, df, delta) + scipy.stats.nct.cdf(-crit, df, delta)


def test_runs_needed_matches_hand_loop():
    cases = [(0.5, 1.0, 1.0), (-0.3, 0.5, 2.0), (1.5, 1.0, 0.2), (0.05, 1.0, 1.0)]
    d, va, vb = (np.array(c) for c in zip(*cases))
    for alpha in (0.01, 0.05):
        got = viz.runs_needed(d, va, vb, alpha)
        for k, (dk, vak, vbk) in enumerate(cases):
            # the normal approximation, in closed form, is slightly optimistic: start below it
            z = scipy.stats.norm.isf(alpha / 2) + scipy.stats.norm.isf(0.2)
            normal = z ** 2 * (vak + vbk) / dk ** 2
            n = max(2, int(normal) - 3)
            assert n == 2 or power_by_hand(n, dk, vak, vbk, alpha) < 0.8
            while power_by_hand(n, dk, vak, vbk, alpha) < 0.8:
                n += 1
            assert got[k] == n
            assert normal <= n <= normal + 5


def test_runs_needed_reaches_80_percent_power_in_simulation():
    rng = np.random.default_rng(11)
    d, va, vb, alpha = 0.6, 1.0, 2.25, 0.05
    n = int(viz.runs_needed(np.array([d]), np.array([va]), np.array([vb]), alpha)[0])
    reps = 4000
    a = rng.normal(d, np.sqrt(va), size=(n, reps))
    b = rng.normal(0.0, np.sqrt(vb), size=(n, reps))
    rate = (scipy.stats.ttest_ind(a, b, equal_var=False).pvalue < alpha).mean()
    assert abs(rate - 0.8) < 4 * np.sqrt(0.16 / reps) + 0.01
    a, b = a[:n // 2], b[:n // 2]  # half the runs: clearly short of 80%
    assert (scipy.stats.ttest_ind(a, b, equal_var=False).pvalue < alpha).mean() < 0.7


def test_runs_needed_edge_cases():
    got = viz.runs_needed(np.array([0.0, 0.2, np.nan, 0.3, 1e-4]),
                          np.array([1.0, np.nan, 1.0, 0.0, 1.0]),
                          np.array([1.0, 1.0, 1.0, 0.0, 1.0]), 0.01)
    assert np.isinf(got[0]) and np.isnan(got[1]) and np.isnan(got[2]) and got[3] == 2
    z = scipy.stats.norm.isf(0.005) + scipy.stats.norm.isf(0.2)
    assert got[4] == np.ceil(z ** 2 * 2 / 1e-8)  # beyond 10^7 runs: the normal approximation
