"""viz.py: the self-influence table of an experiment.

    python viz.py                        # logits/airbench, rows with p < 0.01
    python viz.py logits/madry --all     # all 40 examples
    python viz.py logits/airbench_cpu --alpha 0.05

For each of the 40 excluded examples: its correct-class margin (the correct logit minus the
logsumexp of the other nine) averaged over the full arm ("with") and over the ablated arm
("without"), the self-influence (with - without), and the two-sided p-value of Welch's
unequal-variance t-test. Reads only the completed rows, and only the 40 columns it needs.
Needs numpy and scipy only (no torch), so it is quick.
"""
import argparse
import sys

import numpy as np
import scipy.stats

import store


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


def welch(a, b):
    """Welch's t-test per column of a (n_a, m) and b (n_b, m), ignoring non-finite entries.

    Returns a dict of arrays (m,): mean_a, mean_b, diff (= mean_a - mean_b), se, t, df, p
    (two-sided), n_a, n_b. Columns with fewer than 2 values in an arm get nan statistics. With no
    variance in either arm the test is degenerate: p is 1 when the means are equal, else 0.
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
    out.update(diff=diff, se=se, t=t, df=df, p=p)
    return out


# -----------------------------------------------------------------------------
#                                 Loading

def load(out):
    """Margins and accuracies of an experiment's completed, non-diverged runs.

    Returns a dict with config, indices (the 40), groups ({'Random': [...], 'Easy': [...]}),
    margins (per arm, (runs, 40) float32), test_acc (per arm), runs (per arm, records), and
    diverged (per arm, count of skipped runs).
    """
    meta, runs = store.read_experiment(out)
    config = meta['config']
    groups = {'Random': list(config['random_indices']), 'Easy': list(config['easy_indices'])}
    indices = groups['Random'] + groups['Easy']
    labels = [meta['labels'][str(i)] for i in indices]
    result = dict(out=out, config=config, indices=indices, groups=groups, margins={},
                  test_acc={}, runs={}, diverged={})
    for arm in store.ARMS:
        ok = [r for r in runs[arm] if r.get('status', 'ok') == 'ok']
        result['diverged'][arm] = len(runs[arm]) - len(ok)
        result['runs'][arm] = ok
        result['margins'][arm] = margins(store.gather_logits(ok, indices), labels)
        result['test_acc'][arm] = np.array([r['test_acc'] for r in ok])
    return result


# -----------------------------------------------------------------------------
#                                 The table

def header(exp):
    n = {arm: len(exp['runs'][arm]) for arm in store.ARMS}
    lines = [f"{exp['out']}: {n['full']} full and {n['ablated']} ablated runs "
             f"(preset {exp['config']['preset']})"]
    acc = ', '.join(f"{arm} {exp['test_acc'][arm].mean():.4f}" if n[arm] else f'{arm} n/a'
                    for arm in store.ARMS)
    lines.append(f'mean test accuracy: {acc}')
    skipped = sum(exp['diverged'].values())
    if skipped:
        lines.append(f"skipped {skipped} diverged runs ({exp['diverged']['full']} full, "
                     f"{exp['diverged']['ablated']} ablated)")
    if min(n.values()) < 2:
        lines.append('note: an arm has fewer than 2 complete runs, so there are no p-values yet')
    elif n['full'] != n['ablated']:
        lines.append(f"note: the arms are unequal ({n['full']} vs {n['ablated']} runs); Welch's "
                     f"test allows that, but a finished experiment has equal arms")
    return lines


def table(exp, stats, show):
    """The seed's table layout. show: boolean mask (40,) of the rows to print."""
    lines = ['Example index      margin               self-influence                  p-value',
             '                with    without']
    offset = 0
    for group, members in exp['groups'].items():
        lines.append(f'{group} examples:')
        rows = range(offset, offset + len(members))
        offset += len(members)
        for i in rows:
            if show[i]:
                p = 'n/a' if np.isnan(stats['p'][i]) else f"{stats['p'][i]:.4f}"
                lines.append(f"{exp['indices'][i]:<16d}{stats['mean_a'][i]:<8.3f}"
                             f"{stats['mean_b'][i]:<16.3f}{stats['diff'][i]:<+32.3f}{p}")
        shown = [stats['diff'][i] for i in rows if show[i]]
        average = f'{np.mean(shown):+.3f}' if shown else 'n/a (no rows)'
        lines.append(f"{'Average:':<40s}{average}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('experiment', nargs='?', default='logits/airbench',
                        help='experiment folder (default logits/airbench)')
    parser.add_argument('--all', action='store_true', help='show all 40 examples')
    parser.add_argument('--alpha', type=float, default=0.01,
                        help='show rows with p below this (default 0.01)')
    args = parser.parse_args(argv)
    try:
        exp = load(args.experiment)
    except store.StoreError as e:
        raise SystemExit(f'error: {e}')
    stats = welch(exp['margins']['full'], exp['margins']['ablated'])
    show = np.ones(len(exp['indices']), bool) if args.all else stats['p'] < args.alpha
    lines = header(exp)
    lines.append('all 40 examples' if args.all else f'rows with p < {args.alpha} '
                 f'(--all shows all 40)')
    print('\n'.join(lines + [''] + table(exp, stats, show)))


if __name__ == '__main__':
    main()
