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
    logits = np.zeros((1, 1, 10), np.float32)
    logits[0, 0, 3] = 60000.0  # near float16's limit; a naive exp would overflow
    logits[0, 0, 4] = 59990.0
    assert viz.margins(logits, [3])[0, 0] == np.float32(10.0) - np.log1p(8 * np.exp(-59990.0))


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
