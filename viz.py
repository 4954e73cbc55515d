"""viz.py: the self-influence table of an experiment.

    python viz.py                        # logits/airbench, rows with p < 0.01
    python viz.py logits/madry --all     # all 40 examples
    python viz.py logits/airbench_cpu --alpha 0.05
    python viz.py logits/airbench --stats --select q          # CIs, n, q-values; rows with q < 0.01
    python viz.py logits/airbench --permutation 10000 --power
    python viz.py logits/airbench --csv rows.csv --json rows.json --plot figure.png
    python viz.py logits/airbench logits/madry                # experiments side by side

For each of the 40 excluded examples: its correct-class margin (the correct logit minus the
logsumexp of the other nine) averaged over the full arm ("with") and over the ablated arm
("without"), the self-influence (with - without), and the two-sided p-value of Welch's
unequal-variance t-test. Reads only the completed rows, and only the 40 columns it needs.
Needs numpy and scipy only (no torch), so it is quick; matplotlib is imported only for --plot.

The table keeps the seed's layout. Around it: a header line on test accuracy (mean +- std per
arm and a Welch test of the change), a header line on how many false positives to expect under
the selection rule (--select), and, below the table, each group's mean self-influence over all
its examples with a 95% CI and its count of significant examples. --stats, --permutation and
--power append columns to the right of the p-value.
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import scipy.stats

import store

LEVEL = 0.95          # confidence level of every interval
POWER = 0.8           # target power of --power
MAX_RUNS_SHOWN = 1e6  # --power prints larger run counts as '>1e+06' (the exports keep them)
FIGSIZE = (12, 5)     # inches; with DPI the PNG of --plot is 1200 x 500 pixels
DPI = 100


# -----------------------------------------------------------------------------
#                                 Statistics

def margins(logits, labels):
    """Correct-class margins (runs, examples) in float32 from logits (runs, examples, 10)."""
    logits = np.asarray(logits, dtype=np.float32)
    labels = np.asarray(labels)
    columns = np.arange(logits.shape[1])
    correct = logits[:, columns, labels]
    others = logits.copy()
    others[:, columns, labels] = -np.inf
    top = others.max(axis=2, keepdims=True)
    with np.errstate(invalid='ignore'):  # rows of non-finite logits give nan, handled by welch
        logsumexp_others = top[..., 0] + np.log(np.exp(others - top).sum(axis=2))
    return correct - logsumexp_others


def welch(a, b, level=LEVEL):
    """Welch's t-test per column of a (n_a, m) and b (n_b, m), ignoring non-finite entries.

    Returns a dict of arrays (m,): mean_a, mean_b, var_a, var_b, diff (= mean_a - mean_b), se,
    t, df (Welch-Satterthwaite), p (two-sided), n_a, n_b, and ci_low, ci_high: the `level`
    confidence interval diff +- t_{df} se. Columns with fewer than 2 values in an arm get nan
    statistics. With no variance in either arm the test is degenerate: p is 1 when the means are
    equal, else 0, and the interval is the single point diff.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = {}
    for name, x in (('a', a), ('b', b)):
        ok = np.isfinite(x)
        n = ok.sum(axis=0)
        x0 = np.where(ok, x, 0.0)
        with np.errstate(invalid='ignore', divide='ignore'):
            mean = x0.sum(axis=0) / n
            var = (np.where(ok, x - mean, 0.0) ** 2).sum(axis=0) / (n - 1)
        out['n_' + name], out['mean_' + name], out['var_' + name] = n, mean, np.where(n > 1, var, np.nan)
    va, vb = out['var_a'] / out['n_a'], out['var_b'] / out['n_b']
    diff = out['mean_a'] - out['mean_b']
    with np.errstate(invalid='ignore', divide='ignore'):
        se = np.sqrt(va + vb)
        t = diff / se
        df = (va + vb) ** 2 / (va ** 2 / (out['n_a'] - 1) + vb ** 2 / (out['n_b'] - 1))
        p = 2 * scipy.stats.t.sf(np.abs(t), df)
        degenerate = (se == 0)
        p = np.where(degenerate, np.where(diff == 0, 1.0, 0.0), p)
        t = np.where(degenerate, np.where(diff == 0, 0.0, np.sign(diff) * np.inf), t)
        half = np.where(degenerate, 0.0, scipy.stats.t.ppf(0.5 + level / 2, df) * se)
    out.update(diff=diff, se=se, t=t, df=df, p=p, ci_low=diff - half, ci_high=diff + half)
    return out


def bh_qvalues(p):
    """Benjamini-Hochberg adjusted p-values ("q-values") of the finite entries of p.

    With the m finite p-values sorted, q_(i) = min over j >= i of m p_(j) / j, capped at 1: the
    smallest false-discovery-rate level at which BH would select that example. Non-finite p
    (an example without a test) give nan and do not count in m.
    """
    return _adjust_sorted(p, lambda p_sorted, m: np.minimum.accumulate(
        (p_sorted * m / np.arange(1, m + 1))[::-1])[::-1])


def holm(p):
    """Holm's step-down adjusted p-values of the finite entries of p (nan elsewhere).

    With the m finite p-values sorted, adjusted_(i) = max over j <= i of (m - j + 1) p_(j),
    capped at 1; selecting adjusted < alpha keeps the family-wise error rate below alpha.
    """
    return _adjust_sorted(p, lambda p_sorted, m: np.maximum.accumulate(
        p_sorted * (m - np.arange(m))))


def _adjust_sorted(p, adjust):
    """Apply adjust(sorted finite p-values, m) to the finite entries of p, capped at 1; nan
    elsewhere."""
    p = np.asarray(p, np.float64)
    adjusted = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    if len(finite):
        order = finite[np.argsort(p[finite], kind='stable')]
        adjusted[order] = np.minimum(1.0, adjust(p[order], len(finite)))
    return adjusted


def _t_from_sums(n1, s1, q1, n, s, q):
    """Welch's t of arm 1 against the rest, from counts, sums and sums of squares."""
    n2, s2, q2 = n - n1, s - s1, q - q1
    with np.errstate(invalid='ignore', divide='ignore'):
        m1, m2 = s1 / n1, s2 / n2
        v1 = np.maximum(q1 - s1 * m1, 0.0) / (n1 - 1)  # max: rounding must not make a
        v2 = np.maximum(q2 - s2 * m2, 0.0) / (n2 - 1)  # zero variance negative
        return (m1 - m2) / np.sqrt(v1 / n1 + v2 / n2)


def permutation_pvalues(a, b, shuffles, seed=0, max_elements=4_000_000):
    """Two-sided permutation p-values per column of a (n_a, m) against b (n_b, m).

    The arm labels of the n_a + n_b runs are shuffled `shuffles` times with a seeded numpy
    Generator; every column sees the same shuffles (a run's examples move together, as they were
    trained together). The statistic is Welch's t, not the raw difference of means: studentising
    keeps the test valid when the arms' variances differ, and makes the p-value comparable with
    Welch's. p = (b + 1) / (shuffles + 1), where b counts shuffles whose |t| reaches the observed
    one (the observed labelling counts as one more shuffle), so p >= 1 / (shuffles + 1).
    Non-finite entries are left out of their column, as in welch().

    Vectorised: with S the 0/1 matrix (shuffles, runs) of "in arm a", the per-column counts, sums
    and sums of squares of arm a are S @ finite, S @ x and S @ x**2, three matrix products.
    The shuffles are processed in chunks of at most max_elements entries of S (32 MB).
    """
    x = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    n_a, runs = len(a), len(x)
    finite = np.isfinite(x)
    with np.errstate(invalid='ignore', divide='ignore'):
        centre = np.where(finite, x, 0.0).sum(axis=0) / finite.sum(axis=0)
    x0 = np.where(finite, x - np.nan_to_num(centre), 0.0)  # centred: smaller rounding in x**2
    ok, x2 = finite.astype(np.float64), x0 ** 2
    totals = ok.sum(axis=0), x0.sum(axis=0), x2.sum(axis=0)

    indicator = np.zeros(runs)
    indicator[:n_a] = 1.0
    observed = np.abs(_t_from_sums(indicator @ ok, indicator @ x0, indicator @ x2, *totals))
    threshold = observed * (1 - 1e-9)  # equal statistics must count despite rounding
    rng = np.random.default_rng(seed)
    extreme = np.zeros(x.shape[1], np.int64)
    chunk = max(1, max_elements // max(runs, 1))
    for start in range(0, shuffles, chunk):
        s = rng.permuted(np.broadcast_to(indicator, (min(chunk, shuffles - start), runs)), axis=1)
        t = _t_from_sums(s @ ok, s @ x0, s @ x2, *totals)
        extreme += (np.abs(t) >= threshold).sum(axis=0)  # nan (no test) never counts
    p = (extreme + 1) / (shuffles + 1)
    n_obs_a, n_obs_b = finite[:n_a].sum(axis=0), finite[n_a:].sum(axis=0)
    p = np.where(np.isnan(observed), 1.0, p)  # 0/0: no variance and equal means, as welch()
    return np.where((n_obs_a < 2) | (n_obs_b < 2), np.nan, p)


def welch_power(n, diff, var_a, var_b, alpha):
    """Power of the two-sided Welch test at level alpha with n runs in each arm, if the true
    difference is diff and the true variances are var_a, var_b: under that alternative t has a
    noncentral t distribution with the Welch-Satterthwaite df and noncentrality
    diff / sqrt((var_a + var_b) / n)."""
    n = np.asarray(n, np.float64)
    df = (n - 1) * (var_a + var_b) ** 2 / (var_a ** 2 + var_b ** 2)
    noncentrality = diff / np.sqrt((var_a + var_b) / n)
    critical = scipy.stats.t.ppf(1 - alpha / 2, df)
    return (scipy.stats.nct.sf(critical, df, noncentrality)
            + scipy.stats.nct.cdf(-critical, df, noncentrality))


def runs_needed(diff, var_a, var_b, alpha, power=POWER, max_runs=10 ** 7):
    """Runs per arm (equal arms) for the two-sided Welch test at level alpha to reach `power`
    against the observed difference, taking the observed variances as the truth.

    The smallest n >= 2 with welch_power(n) >= power, found by a vectorised bisection that
    starts from the normal approximation n = (z_{1-alpha/2} + z_power)^2 (var_a + var_b) / diff^2
    (the t-based answer is a few runs larger for small n). Where that approximation exceeds
    max_runs the two agree and it is returned as is. nan where a variance is missing, inf where
    the observed difference is 0 (no number of runs detects it).
    """
    diff, var_a, var_b = (np.asarray(v, np.float64) for v in (diff, var_a, var_b))
    total = var_a + var_b
    with np.errstate(invalid='ignore', divide='ignore'):
        z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)
        normal = np.ceil(z ** 2 * total / diff ** 2)
    result = np.where(diff == 0, np.inf, np.maximum(normal, 2.0))
    result = np.where(np.isfinite(diff) & np.isfinite(total), result, np.nan)
    result = np.where((total == 0) & (diff != 0), 2.0, result)  # no noise: 2 runs settle it
    todo = np.isfinite(result) & (total > 0) & (result <= max_runs)
    if not todo.any():
        return result
    d, va, vb = diff[todo], var_a[todo], var_b[todo]
    hi = result[todo]
    for _ in range(64):  # grow the upper end until it has the power
        short = welch_power(hi, d, va, vb, alpha) < power
        if not short.any():
            break
        hi = np.where(short, hi * 2, hi)
    lo = np.ones_like(hi)  # n = 1 never has power (no variance estimate)
    while (hi - lo > 1).any():
        mid = np.floor((lo + hi) / 2)
        enough = welch_power(mid, d, va, vb, alpha) >= power
        hi, lo = np.where(enough, mid, hi), np.where(enough, lo, mid)
    result[todo] = hi
    return result


def select(stats, rule, alpha):
    """Boolean mask of the examples selected by `rule` at alpha: 'p' (Welch p < alpha,
    uncorrected, the seed's rule), 'q' (Benjamini-Hochberg q < alpha) or 'holm' (Holm-adjusted
    p < alpha)."""
    value = {'p': stats['p'], 'q': stats['q'], 'holm': stats['holm']}[rule]
    return np.nan_to_num(value, nan=1.0) < alpha


def analyse(exp, alpha, rule):
    """Per-example Welch statistics with q-values, Holm p-values and the selection mask."""
    stats = welch(exp['margins']['full'], exp['margins']['ablated'])
    stats['q'] = bh_qvalues(stats['p'])
    stats['holm'] = holm(stats['p'])
    stats['selected'] = select(stats, rule, alpha)
    return stats


def group_rows(exp):
    """(group name, range of its rows among the 40) for each group, in table order."""
    start = 0
    for group, members in exp['groups'].items():
        yield group, range(start, start + len(members))
        start += len(members)


def group_summaries(exp, stats):
    """Per group: the mean self-influence over ALL its examples with a 95% CI, and the counts
    of selected examples with positive and with negative self-influence.

    The CI comes from Welch's test on per-run group means: each run's margin averaged over the
    group's examples. The mean of those over an arm is the mean of the per-example arm means,
    so (with no margin missing) the difference is exactly the mean of the per-example
    self-influences, the row the seed's selected-rows "Average" tries to be. Combining the
    per-example standard errors as if independent would be wrong: the examples share their
    runs (a run that is better on one easy example tends to be better on all), so their
    estimates are correlated. The runs, in contrast, are independent, and the per-run group
    mean carries that correlation into its variance. The interval is about these 20 examples;
    it does not generalise to other examples drawn the same way. A run with a non-finite
    margin in the group is left out of that group's summary.
    """
    out = {}
    for group, rows in group_rows(exp):
        cols = slice(rows.start, rows.stop)
        per_run = {arm: exp['margins'][arm][:, cols].astype(np.float64).mean(axis=1)[:, None]
                   if len(rows) else np.zeros((0, 1)) for arm in store.ARMS}
        w = {k: v[0] for k, v in welch(per_run['full'], per_run['ablated']).items()}
        selected, diff = stats['selected'][cols], stats['diff'][cols]
        out[group] = dict(n_examples=len(rows), self_influence=float(w['diff']),
                          ci_low=float(w['ci_low']), ci_high=float(w['ci_high']),
                          p=float(w['p']), n_full=int(w['n_a']), n_ablated=int(w['n_b']),
                          positive=int((selected & (diff > 0)).sum()),
                          negative=int((selected & (diff < 0)).sum()))
    return out


def accuracy_summary(exp):
    """Mean and standard deviation of test accuracy per arm, and Welch's test of the change that
    removing the 40 brings: 'removal_change' = mean(ablated) - mean(full), with its CI."""
    out = {}
    for arm in store.ARMS:
        acc = exp['test_acc'][arm].astype(np.float64)
        out[arm] = dict(n=len(acc), mean=float(acc.mean()) if len(acc) else math.nan,
                        std=float(acc.std(ddof=1)) if len(acc) > 1 else math.nan)
    w = welch(exp['test_acc']['ablated'][:, None], exp['test_acc']['full'][:, None])
    out.update(removal_change=float(w['diff'][0]), ci_low=float(w['ci_low'][0]),
               ci_high=float(w['ci_high'][0]), p=float(w['p'][0]))
    return out


# -----------------------------------------------------------------------------
#                                 Loading

def load(out):
    """Margins and accuracies of an experiment's completed, non-diverged runs.

    Returns a dict with config, indices (the 40), groups ({'Random': [...], 'Easy': [...]}),
    labels (of the 40), margins (per arm, (runs, 40) float32), test_acc (per arm), runs (per
    arm, records), and diverged (per arm, count of skipped runs).
    """
    meta, runs = store.read_experiment(out)
    config = meta['config']
    groups = {'Random': list(config['random_indices']), 'Easy': list(config['easy_indices'])}
    indices = groups['Random'] + groups['Easy']
    missing = [i for i in indices if str(i) not in meta.get('labels', {})]
    if missing:
        raise store.StoreError(f'{out}/meta.json has no class labels for examples {missing[:5]}; '
                               f'it was written by an older trainer, so retrain it')
    labels = [meta['labels'][str(i)] for i in indices]
    result = dict(out=out, config=config, indices=indices, groups=groups, labels=labels,
                  margins={}, test_acc={}, runs={}, diverged={})
    for arm in store.ARMS:
        ok = [r for r in runs[arm] if r.get('status', 'ok') == 'ok']
        result['diverged'][arm] = len(runs[arm]) - len(ok)
        result['runs'][arm] = ok
        result['margins'][arm] = margins(store.gather_logits(ok, indices), labels)
        result['test_acc'][arm] = np.array([r['test_acc'] for r in ok], np.float64)
    return result


# -----------------------------------------------------------------------------
#                                 Tables, exports and the figure

def fmt(x, spec):
    """x formatted with spec, or 'n/a' when it is nan."""
    return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def header(exp):
    n = {arm: len(exp['runs'][arm]) for arm in store.ARMS}
    lines = [f"{exp['out']}: {n['full']} full and {n['ablated']} ablated runs "
             f"(preset {exp['config']['preset']})"]
    lines.append(accuracy_line(accuracy_summary(exp)))
    skipped = sum(exp['diverged'].values())
    if skipped:
        lines.append(f"skipped {skipped} diverged runs ({exp['diverged']['full']} full, "
                     f"{exp['diverged']['ablated']} ablated)")
    if min(n.values()) < 2:
        lines.append('note: an arm has fewer than 2 usable runs (complete, not diverged), so '
                     'there are no p-values yet')
    elif n['full'] != n['ablated']:
        lines.append(f"note: the arms are unequal ({n['full']} vs {n['ablated']} runs); Welch's "
                     f"test allows that, but a finished experiment has equal arms")
    return lines


def accuracy_line(acc):
    arms = ', '.join(f"{arm} {fmt(acc[arm]['mean'], '.4f')} +- {fmt(acc[arm]['std'], '.4f')}"
                     for arm in store.ARMS)
    return (f"test accuracy (mean +- std): {arms}; removing the 40 changes it by "
            f"{fmt(acc['removal_change'], '+.4f')} [{LEVEL:.0%} CI {fmt(acc['ci_low'], '+.4f')}, "
            f"{fmt(acc['ci_high'], '+.4f')}], Welch p = {fmt(acc['p'], '.4f')}")


RULE_NAMES = {'p': 'p', 'q': 'q (BH)', 'holm': 'Holm-adjusted p'}


def selection_line(rule, alpha, stats):
    """What the selection rule promises about false positives, stated as it holds."""
    m = int(np.isfinite(stats['p']).sum())
    chosen = int(stats['selected'].sum())
    if rule == 'p':
        return (f'selection: p < {alpha} for each of {m} tests, no multiple-testing correction; '
                f'expected false positives = {alpha} x (examples without a true effect), '
                f'at most {alpha * m:.2f} (reached when no example has an effect)')
    if rule == 'q':
        return (f'selection: Benjamini-Hochberg q < {alpha} over {m} tests; expected share of '
                f'false positives among the selected <= {alpha}, so about {alpha * chosen:.2f} '
                f'of the {chosen} selected (valid for independent or positively dependent tests)')
    return (f'selection: Holm-adjusted p < {alpha} over {m} tests; probability of one or more '
            f'false positives among the {chosen} selected <= {alpha}, whatever the dependence')


def table(exp, stats, show, extras=(), summaries=None, rule=None, alpha=None):
    """The seed's table layout. show: boolean mask (40,) of the rows to print. extras: columns
    (title, width, list of 40 strings) appended after the p-value; none in the seed's table.
    summaries (from group_summaries): two lines under each group's "Average:" row, the mean over
    all of the group's examples and its counts of significant examples under `rule` at alpha."""
    first = 'Example index      margin               self-influence                  p-value'
    if extras:
        first = f'{first:<82s}' + ''.join(f'{title:<{width}s}' for title, width, _ in extras)
    lines = [first.rstrip(), '                with    without']
    for group, rows in group_rows(exp):
        lines.append(f'{group} examples:')
        for i in rows:
            if show[i]:
                p = 'n/a' if np.isnan(stats['p'][i]) else f"{stats['p'][i]:.4f}"
                if extras:
                    p = f'{p:<10s}' + ''.join(f'{col[i]:<{width}s}' for _, width, col in extras)
                lines.append((f"{exp['indices'][i]:<16d}{stats['mean_a'][i]:<8.3f}"
                              f"{stats['mean_b'][i]:<16.3f}{stats['diff'][i]:<+32.3f}{p}").rstrip())
        shown = [stats['diff'][i] for i in rows if show[i]]
        average = fmt(float(np.mean(shown)), '+.3f') if shown else 'n/a (no rows)'
        lines.append(f"{'Average:':<40s}{average}")
        if summaries is not None:
            g = summaries[group]
            lines.append(f"{f'All {len(rows)}:':<40s}{fmt(g['self_influence'], '+.3f'):<32s}"
                         f"{fmt(g['p'], '.4f')}   {LEVEL:.0%} CI "
                         f"[{fmt(g['ci_low'], '+.3f')}, {fmt(g['ci_high'], '+.3f')}]")
            lines.append(f"{'Significant:':<40s}{g['positive']} positive, {g['negative']} "
                         f"negative ({RULE_NAMES[rule]} < {alpha})")
    return lines


def summary_note():
    return ("'Average:' is over the rows shown, so selection inflates it; 'All' is over every "
            f"example of the group, with a {LEVEL:.0%} CI from Welch's test on per-run group-mean "
            "margins")


def extra_columns(exp, stats, args):
    """The columns that --stats, --permutation and --power append to the table."""
    m = len(exp['indices'])
    cols = []
    if args.stats:
        cols.append((f'{LEVEL:.0%} CI', 20, [f"[{fmt(stats['ci_low'][i], '+.3f')}, "
                                              f"{fmt(stats['ci_high'][i], '+.3f')}]"
                                              for i in range(m)]))
        cols.append(('n full/abl', 12, [f"{stats['n_a'][i]}/{stats['n_b'][i]}" for i in range(m)]))
        cols.append(('q (BH)', 9, [fmt(stats['q'][i], '.4f') for i in range(m)]))
        cols.append(('Holm p', 9, [fmt(stats['holm'][i], '.4f') for i in range(m)]))
    if 'p_perm' in stats:
        cols.append(('perm p', 9, [fmt(stats['p_perm'][i], '.4f') for i in range(m)]))
    if args.power:
        def needed(i):
            if stats['selected'][i]:
                return '-'
            n = stats['runs_needed'][i]
            if np.isnan(n):
                return 'n/a'
            # An effect that small is out of reach of any experiment: no point in its digits.
            return 'never' if np.isinf(n) else f'>{MAX_RUNS_SHOWN:.0e}' if n > MAX_RUNS_SHOWN \
                else f'{n:.0f}'
        cols.append(('runs/arm', 10, [needed(i) for i in range(m)]))
    return cols


def labelings_note(exp, shuffles):
    """Where the runs allow fewer distinct labellings than shuffles, the p-value's real floor."""
    n_full, n_ablated = (len(exp['runs'][arm]) for arm in store.ARMS)
    distinct = math.comb(n_full + n_ablated, n_full)
    if distinct >= shuffles or min(n_full, n_ablated) < 2:
        return ''
    # Two-sided: a labelling and its mirror image (arms swapped) give the same |t| when the arms
    # are equal in size, so the observed one is matched by at least itself and its mirror.
    floor = (2 if n_full == n_ablated else 1) / distinct
    return (f'; with {n_full} + {n_ablated} runs there are only {distinct} distinct labellings, '
            f'so p cannot fall much below {floor:.2g}')


def power_alpha(rule, alpha, m):
    """The per-test level that --power plans for: alpha, or alpha / m for Holm (Holm selects
    everything that Bonferroni selects, so that level suffices)."""
    return alpha / m if rule == 'holm' and m else alpha


ROW_FIELDS = ['index', 'group', 'label', 'n_full', 'n_ablated', 'margin_full', 'margin_ablated',
              'var_full', 'var_ablated', 'self_influence', 'se', 'ci_low', 'ci_high', 't', 'df',
              'p', 'q_bh', 'p_holm', 'selected', 'p_perm', 'runs_needed']
STAT_KEYS = dict(n_full='n_a', n_ablated='n_b', margin_full='mean_a', margin_ablated='mean_b',
                 var_full='var_a', var_ablated='var_b', self_influence='diff', q_bh='q',
                 p_holm='holm')


def export_rows(exp, stats):
    """All examples with every statistic, as dicts of plain Python values (nan where missing)."""
    group_of = {i: g for g, members in exp['groups'].items() for i in members}
    rows = []
    for k, index in enumerate(exp['indices']):
        row = dict(index=int(index), group=group_of[index], label=int(exp['labels'][k]))
        for field in ROW_FIELDS[3:]:
            value = stats.get(STAT_KEYS.get(field, field))
            value = math.nan if value is None else value[k]
            row[field] = bool(value) if field == 'selected' else \
                int(value) if field.startswith('n_') else float(value)
        rows.append(row)
    return rows


def export_summary(exp, stats, args, accuracy, groups):
    return dict(experiment=exp['out'], config=exp['config'],
                runs={arm: len(exp['runs'][arm]) for arm in store.ARMS},
                diverged=dict(exp['diverged']), alpha=args.alpha, select=args.select,
                permutation_shuffles=args.permutation or None, seed=args.seed,
                power=POWER, power_alpha=power_alpha(args.select, args.alpha, len(exp['indices'])),
                accuracy=accuracy, groups=groups)


def _json_safe(obj):
    """nan and inf become null: they are not JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path, summary, rows):
    with open(path, 'w') as f:
        json.dump(_json_safe(dict(summary, rows=rows)), f, indent=1)


def write_csv(path, summary, rows):
    """One line per example. The experiment's config and run counts ride along as leading '#'
    comment lines (read with csv after skipping them, or pandas.read_csv(path, comment='#')),
    so that the file stays self-describing without a sidecar. Floats are written with repr, so
    they read back exactly; nan stays 'nan'."""
    with open(path, 'w', newline='') as f:
        f.write(f"# viz.py export of {summary['experiment']}\n")
        for key in ('runs', 'diverged', 'alpha', 'select', 'permutation_shuffles', 'seed',
                    'power', 'power_alpha', 'accuracy', 'groups', 'config'):
            f.write(f'# {key}: {json.dumps(_json_safe(summary[key]))}\n')
        writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        writer.writeheader()
        writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in row.items()}
                         for row in rows)


def plot(path, exp, stats):
    """A two-panel PNG (FIGSIZE at DPI): self-influence with its CI per example, each group
    sorted; and the margins with and without for the most negative easy example and the most
    positive random one."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.transforms import blended_transform_factory

    n = {arm: len(exp['runs'][arm]) for arm in store.ARMS}
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI,
                                      gridspec_kw=dict(width_ratios=[2.2, 1]))
    fig.suptitle(f"Self-influence in {exp['out']} (preset {exp['config']['preset']}): "
                 f"{n['full']} runs with, {n['ablated']} without the 40")
    x, ticks, position = [], [], 0
    for colour, (group, rows) in zip(('tab:blue', 'tab:orange'), group_rows(exp)):
        idx = rows.start + np.argsort(stats['diff'][rows.start:rows.stop], kind='stable')
        pos = position + np.arange(len(idx))
        position += len(idx) + 1  # a gap between the groups
        low, high = stats['ci_low'][idx], stats['ci_high'][idx]
        errors = np.nan_to_num(np.vstack([stats['diff'][idx] - low, high - stats['diff'][idx]]))
        left.errorbar(pos, stats['diff'][idx], yerr=errors, fmt='o', ms=4, capsize=2,
                      color=colour, label=f'{group} ({len(idx)})')
        x += list(pos)
        ticks += [str(exp['indices'][i]) for i in idx]
    left.axhline(0, color='black', lw=0.8)
    left.set_xticks(x, ticks, rotation=90, fontsize=6)
    left.set_xlabel('training example (index), sorted within each group')
    left.set_ylabel(f'self-influence: margin with - without ({LEVEL:.0%} CI)')
    left.legend(loc='best', fontsize=8)

    n_random, picks = len(exp['groups']['Random']), []
    if exp['groups']['Easy']:
        easy = n_random + int(np.argmin(np.nan_to_num(stats['diff'][n_random:], nan=np.inf)))
        picks.append(('most negative easy', easy))
    if n_random:
        random = int(np.argmax(np.nan_to_num(stats['diff'][:n_random], nan=-np.inf)))
        picks.append(('most positive random', random))
    data, colours = [], []
    below = blended_transform_factory(right.transData, right.transAxes)
    for k, (name, i) in enumerate(picks):
        for arm, colour in (('full', 'tab:green'), ('ablated', 'tab:red')):
            values = exp['margins'][arm][:, i].astype(np.float64)
            data.append(values[np.isfinite(values)])
            colours.append(colour)
        right.text(2 * k + 1.5, -0.1, f"{name}\n(#{exp['indices'][i]})", transform=below,
                   ha='center', va='top', fontsize=8)
    if data:
        right.boxplot(data, showfliers=False, medianprops=dict(color='black'))
        jitter = np.random.default_rng(0)
        for k, (values, colour) in enumerate(zip(data, colours)):
            shown = values if len(values) <= 300 else jitter.choice(values, 300, replace=False)
            right.scatter(k + 1 + jitter.uniform(-0.15, 0.15, len(shown)), shown, s=6,
                          alpha=0.5, color=colour)
        right.set_xticks(range(1, len(data) + 1), ['with', 'without'] * len(picks), fontsize=8)
    right.set_ylabel('correct-class margin per run')
    right.set_title('margins with and without the example (box: quartiles)', fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def side_by_side(experiments, rule, alpha):
    """One row per example, one self-influence column per experiment ('*': selected by rule),
    and per group the mean over all its examples and how many examples agree in sign."""
    lines = []
    for k, (exp, stats) in enumerate(experiments, 1):
        n = {arm: len(exp['runs'][arm]) for arm in store.ARMS}
        lines.append(f"({k}) {exp['out']}: {n['full']} full and {n['ablated']} ablated runs "
                     f"(preset {exp['config']['preset']})")
    lines.append(f'self-influence per experiment; * marks {RULE_NAMES[rule]} < {alpha}')
    lines.append('')
    lines.append((f"{'Example index':<16s}"
                  + ''.join(f'{f"({k})":<12s}' for k in range(1, len(experiments) + 1))).rstrip())
    first = experiments[0][0]
    summaries = [group_summaries(e, s) for e, s in experiments]
    for group, rows in group_rows(first):
        lines.append(f'{group} examples:')
        for i in rows:
            cells = ''.join(f"{fmt(s['diff'][i], '+.3f') + ('*' if s['selected'][i] else ''):<12s}"
                            for _, s in experiments)
            lines.append(f"{first['indices'][i]:<16d}{cells}".rstrip())
        means = ''.join(f"{fmt(g[group]['self_influence'], '+.3f'):<12s}" for g in summaries)
        lines.append(f"{'Mean (all):':<16s}{means}".rstrip())
        signs = np.array([np.sign(s['diff'][rows.start:rows.stop]) for _, s in experiments])
        comparable = np.isfinite(signs).all(axis=0)
        agree = comparable & (signs == signs[0]).all(axis=0) & (signs[0] != 0)
        both = comparable & np.array([s['selected'][rows.start:rows.stop]
                                      for _, s in experiments]).all(axis=0)
        selected = (f'{int((agree & both).sum())} of the {int(both.sum())} selected in all agree'
                    if both.any() else 'none is selected in all')
        lines.append(f'Sign agreement: {int(agree.sum())} of {int(comparable.sum())} examples '
                     f'have the same sign in all experiments; {selected}')
    return lines


# -----------------------------------------------------------------------------
#                                 Main

def emit(lines):
    """Print the table. Piped into a reader that stops early (`| head`) it goes on quietly, so
    that the files asked for are still written."""
    try:
        print('\n'.join(lines), flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit


def main(argv=None):
    parser = argparse.ArgumentParser(description='\n\n'.join(__doc__.split('\n\n')[:2]),
                                     allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    percent = lambda x: f'{x:.0%}'.replace('%', '%%')  # argparse help is a %-format string
    parser.add_argument('experiment', nargs='*', default=['logits/airbench'],
                        help='experiment folder (default logits/airbench); several print side by '
                             'side')
    parser.add_argument('--all', action='store_true', help='show all 40 examples')
    parser.add_argument('--alpha', type=float, default=0.01,
                        help='show rows with p (or --select) below this (default 0.01)')
    parser.add_argument('--select', choices=('p', 'q', 'holm'), default='p',
                        help='which value must be below alpha: Welch p uncorrected (default), '
                             'Benjamini-Hochberg q, or Holm-adjusted p')
    parser.add_argument('--stats', action='store_true',
                        help=f'add columns: {percent(LEVEL)} CI, n per arm, q (BH), Holm p')
    parser.add_argument('--permutation', type=int, default=0, metavar='K',
                        help='add a column: permutation p-value from K label shuffles')
    parser.add_argument('--seed', type=int, default=0, help='seed of the shuffles (default 0)')
    parser.add_argument('--power', action='store_true',
                        help=f'add a column: runs per arm for {percent(POWER)} power, for the '
                             f'rows not selected (implies --all)')
    parser.add_argument('--csv', metavar='FILE', help='write all rows and statistics as CSV')
    parser.add_argument('--json', metavar='FILE', help='write all rows, statistics and config '
                                                       'as JSON')
    parser.add_argument('--plot', metavar='FILE.png', help='draw the figure (1200 x 500 pixels)')
    args = parser.parse_args(argv)
    if args.permutation < 0:
        parser.error('--permutation needs K >= 0 shuffles')
    if not 0 < args.alpha < 1:
        parser.error(f'--alpha must lie strictly between 0 and 1, got {args.alpha}')
    if args.seed < 0:
        parser.error(f'--seed must be 0 or more, got {args.seed}')
    if args.plot:  # the format follows the extension: refuse an unknown one before any work
        from matplotlib.backend_bases import FigureCanvasBase
        formats = FigureCanvasBase.get_supported_filetypes()
        extension = os.path.splitext(args.plot)[1].lstrip('.').lower()
        if extension and extension not in formats:
            parser.error(f'--plot {args.plot}: matplotlib cannot write .{extension} files '
                         f'(it can: {", ".join(sorted(formats))})')
    try:
        exps = [load(path) for path in args.experiment]
    except store.StoreError as e:
        raise SystemExit(f'error: {e}')

    if len(exps) > 1:
        single = [flag for flag in ('stats', 'permutation', 'power', 'csv', 'json', 'plot')
                  if getattr(args, flag)]
        if single:
            parser.error(f"--{', --'.join(single)} need a single experiment, not several")
        if any(e['groups'] != exps[0]['groups'] for e in exps):
            raise SystemExit('error: the experiments exclude different examples; side by side '
                             'needs the same random and easy indices')
        pairs = [(e, analyse(e, args.alpha, args.select)) for e in exps]
        emit(side_by_side(pairs, args.select, args.alpha))
        return

    exp = exps[0]
    stats = analyse(exp, args.alpha, args.select)
    m = len(exp['indices'])
    level = power_alpha(args.select, args.alpha, m)
    stats['runs_needed'] = runs_needed(stats['diff'], stats['var_a'], stats['var_b'], level)
    if args.permutation:
        stats['p_perm'] = permutation_pvalues(exp['margins']['full'], exp['margins']['ablated'],
                                              args.permutation, args.seed)
    accuracy = accuracy_summary(exp)
    groups = group_summaries(exp, stats)

    args.all = args.all or args.power  # the power column is about the rows not selected
    show = np.ones(m, bool) if args.all else stats['selected']
    lines = header(exp)
    lines.append(selection_line(args.select, args.alpha, stats))
    lines.append(summary_note())
    if args.permutation:
        lines.append(f'perm p: {args.permutation} shuffles of the arm labels (seed {args.seed}), '
                     f"Welch's t as statistic, p = (b + 1) / (K + 1) >= "
                     f'{1 / (args.permutation + 1):.2g}' + labelings_note(exp, args.permutation))
    if args.power:
        lines.append(f'runs/arm: runs per arm for {POWER:.0%} power of one two-sided Welch test '
                     f'at level {level:.3g} against the observed effect and variances')
    lines.append(f'all {m} examples' if args.all else f'rows with {RULE_NAMES[args.select]} < '
                 f'{args.alpha} (--all shows all {m})')
    lines += [''] + table(exp, stats, show, extra_columns(exp, stats, args), groups,
                          args.select, args.alpha)
    emit(lines)

    try:
        if args.csv or args.json:
            summary = export_summary(exp, stats, args, accuracy, groups)
            rows = export_rows(exp, stats)
            if args.csv:
                write_csv(args.csv, summary, rows)
            if args.json:
                write_json(args.json, summary, rows)
        if args.plot:
            plot(args.plot, exp, stats)
    except OSError as e:
        raise SystemExit(f'error: cannot write {e.filename or "the output"}: '
                         f'{e.strerror or e}') from None


if __name__ == '__main__':
    main()
