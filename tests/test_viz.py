"""viz.py on synthetic experiments with planted effects, checked against scipy and hand loops."""
import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

import store
import viz
from conftest import REPO, make_experiment

EASY = [245, 298, 137, 206, 182, 295, 224, 114, 259, 179,  # unsorted, as the real ones;
        227, 141, 231, 140, 215, 290, 236, 112, 189, 220]  # small, to keep the files small
ROW = re.compile(r'^(\d+)\s+(-?\d+\.\d+)\s+(-?\d+\.\d+)\s+([+-]\d+\.\d+)\s+(n/a|\d\.\d+)(.*)$')


def planted_margins(seed=0, runs=60, effects=None):
    """40 examples: random ones without effect except two, easy ones with negative effects."""
    rng = np.random.default_rng(seed)
    if effects is None:
        effects = np.r_[np.zeros(18), 0.8, -0.7, -np.linspace(0.0, 1.2, 20)]
    full = rng.normal(4.0, 1.0, size=(runs, 40)) + effects
    ablated = rng.normal(4.0, 1.3, size=(runs, 40))
    return full, ablated


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
    """One experiment for the tests that only read it."""
    full, ablated = planted_margins()
    out = str(tmp_path_factory.mktemp('viz') / 'planted')
    acc = {'full': np.linspace(0.90, 0.94, 60), 'ablated': np.linspace(0.905, 0.935, 60)[::-1]}
    made = make_experiment(out, full, ablated, random_indices=list(range(20)),
                           easy_indices=EASY, test_acc=acc)
    made['out'] = out
    return made


def run_viz(args, capsys):
    capsys.readouterr()
    viz.main(args)
    return capsys.readouterr().out.splitlines()


def table_rows(lines):
    """{index: (with, without, self-influence, p-string, rest of the line)} of the table."""
    rows = {}
    for line in lines:
        match = ROW.match(line)
        if match:
            rows[int(match[1])] = (float(match[2]), float(match[3]), float(match[4]), match[5],
                                   match[6])
    return rows


def scipy_tests(made):
    a, b = made['margins']['full'], made['margins']['ablated']
    return scipy.stats.ttest_ind(a, b, equal_var=False, axis=0)


def test_load_reads_the_planted_margins_and_skips_diverged_runs(tmp_path):
    full, ablated = planted_margins(runs=8)
    out = str(tmp_path / 'exp')
    made = make_experiment(out, full, ablated, diverged={'ablated': [2, 5]})
    exp = viz.load(out)
    assert np.array_equal(exp['margins']['full'], made['margins']['full'])
    assert np.array_equal(exp['margins']['ablated'], np.delete(made['margins']['ablated'],
                                                                [2, 5], axis=0))
    assert exp['diverged'] == {'full': 0, 'ablated': 2}
    assert exp['labels'] == made['labels'].tolist()


def test_default_output_keeps_the_seed_layout(planted, capsys):
    lines = run_viz([planted['out']], capsys)
    test = scipy_tests(planted)
    start = lines.index('Example index      margin               self-influence'
                        '                  p-value')
    assert lines[start + 1] == '                with    without'
    assert lines[start - 2] == 'rows with p < 0.01 (--all shows all 40)'
    assert lines[start + 2] == 'Random examples:'
    rows = table_rows(lines)
    assert set(rows) == {planted['indices'][i] for i in np.flatnonzero(test.pvalue < 0.01)}
    for i, index in enumerate(planted['indices']):
        if index in rows:
            with_, without, diff, p, rest = rows[index]
            assert rest == ''  # no columns beyond the seed's
            expected = (planted['margins']['full'][:, i].mean()
                        - planted['margins']['ablated'][:, i].mean())
            assert abs(diff - expected) < 6e-4
            assert abs(float(p) - test.pvalue[i]) < 6e-5
    averages = [line for line in lines if line.startswith('Average:')]
    assert len(averages) == 2  # the seed's (selected-rows) averages stay


def test_stats_columns_match_scipy(planted, capsys):
    lines = run_viz([planted['out'], '--all', '--stats'], capsys)
    test = scipy_tests(planted)
    q = scipy.stats.false_discovery_control(test.pvalue, method='bh')
    rows = table_rows(lines)
    assert len(rows) == 40
    for i, index in enumerate(planted['indices']):
        rest = rows[index][4].split()
        low, high = float(rest[0].strip('[,')), float(rest[1].strip(']'))
        ci = scipy.stats.ttest_ind(planted['margins']['full'][:, i],
                                   planted['margins']['ablated'][:, i],
                                   equal_var=False).confidence_interval(0.95)
        assert abs(low - ci.low) < 6e-4 and abs(high - ci.high) < 6e-4
        assert rest[2] == '60/60'
        assert abs(float(rest[3]) - q[i]) < 6e-5
        holm_hand = max(min(1.0, (40 - r) * p) for r, p in enumerate(np.sort(test.pvalue))
                        if p <= test.pvalue[i])
        assert abs(float(rest[4]) - holm_hand) < 6e-5


@pytest.mark.parametrize('rule', ['p', 'q', 'holm'])
def test_select_rules_and_the_false_positive_statement(planted, capsys, rule):
    alpha = 0.05
    lines = run_viz([planted['out'], '--select', rule, '--alpha', str(alpha)], capsys)
    p = scipy_tests(planted).pvalue
    value = {'p': p, 'q': scipy.stats.false_discovery_control(p, method='bh'),
             'holm': np.minimum(1, np.maximum.accumulate(np.sort(p) * (40 - np.arange(40))))
             [np.argsort(np.argsort(p))]}[rule]
    expected = {planted['indices'][i] for i in np.flatnonzero(value < alpha)}
    assert set(table_rows(lines)) == expected
    assert 0 < len(expected) < 40  # the planted effects make the rules differ
    statement = next(line for line in lines if line.startswith('selection:'))
    if rule == 'p':
        assert f'at most {alpha * 40:.2f}' in statement and 'no multiple-testing' in statement
    elif rule == 'q':
        assert f'about {alpha * len(expected):.2f} of the {len(expected)} selected' in statement
    else:
        assert f'probability of one or more false positives among the {len(expected)} ' \
               f'selected <= {alpha}' in statement


def test_group_summaries_use_all_examples_and_per_run_means(planted, capsys):
    lines = run_viz([planted['out']], capsys)
    p = scipy_tests(planted).pvalue
    diffs = planted['margins']['full'].mean(0) - planted['margins']['ablated'].mean(0)
    for group, cols in (('Random', slice(0, 20)), ('Easy', slice(20, 40))):
        start = lines.index(f'{group} examples:')
        average = next(i for i in range(start, len(lines)) if lines[i].startswith('Average:'))
        # the two summary lines sit right under the group's "Average:" row
        assert lines[average + 1].startswith('All 20:')
        assert lines[average + 2].startswith('Significant:')
        numbers = re.search(r'All 20: +([+-][\d.]+) +([\d.]+) +95% CI \[([+-][\d.]+), '
                            r'([+-][\d.]+)\]', lines[average + 1])
        counts = re.search(r'Significant: +(\d+) positive, (\d+) negative \(p < 0.01\)',
                           lines[average + 2])
        full = planted['margins']['full'][:, cols].mean(1)
        ablated = planted['margins']['ablated'][:, cols].mean(1)
        test = scipy.stats.ttest_ind(full, ablated, equal_var=False)
        ci = test.confidence_interval(0.95)
        assert abs(float(numbers[1]) - diffs[cols].mean()) < 6e-4  # the mean of all 20
        assert abs(float(numbers[2]) - test.pvalue) < 6e-5
        assert abs(float(numbers[3]) - ci.low) < 6e-4 and abs(float(numbers[4]) - ci.high) < 6e-4
        significant = p[cols] < 0.01
        assert int(counts[1]) == (significant & (diffs[cols] > 0)).sum()
        assert int(counts[2]) == (significant & (diffs[cols] < 0)).sum()
        if group == 'Easy':
            assert int(counts[2]) >= 10  # planted: most easy ones negative


def test_accuracy_line(planted, capsys):
    lines = run_viz([planted['out']], capsys)
    line = next(line for line in lines if line.startswith('test accuracy (mean +- std)'))
    full, ablated = planted['test_acc']['full'], planted['test_acc']['ablated']
    test = scipy.stats.ttest_ind(ablated, full, equal_var=False)
    ci = test.confidence_interval(0.95)
    assert f'full {full.mean():.4f} +- {full.std(ddof=1):.4f}' in line
    assert f'ablated {ablated.mean():.4f} +- {ablated.std(ddof=1):.4f}' in line
    assert f'changes it by {ablated.mean() - full.mean():+.4f} [95% CI {ci.low:+.4f}, ' \
           f'{ci.high:+.4f}], Welch p = {test.pvalue:.4f}' in line


def test_permutation_and_power_columns(planted, capsys):
    lines = run_viz([planted['out'], '--all', '--permutation', '3000', '--power'], capsys)
    test = scipy_tests(planted)
    rows = table_rows(lines)
    for i, index in enumerate(planted['indices']):
        perm, needed = rows[index][4].split()
        tolerance = 0.015 + 4 * np.sqrt(test.pvalue[i] * (1 - test.pvalue[i]) / 3000)
        assert abs(float(perm) - test.pvalue[i]) <= tolerance
        assert float(perm) >= round(1 / 3001, 4)  # (b + 1) / (K + 1), printed to 4 places
        if test.pvalue[i] < 0.01:
            assert needed == '-'
        else:  # the t-based answer is at least the closed-form normal approximation
            a, b = planted['margins']['full'][:, i], planted['margins']['ablated'][:, i]
            z = scipy.stats.norm.isf(0.005) + scipy.stats.norm.isf(0.2)
            normal = z ** 2 * (a.var(ddof=1) + b.var(ddof=1)) / (a.mean() - b.mean()) ** 2
            if needed == '>1e+06':
                assert normal > 1e6
            else:
                assert normal <= int(needed) <= normal + 5


def test_csv_and_json_round_trip(planted, tmp_path, capsys):
    csv_path, json_path = str(tmp_path / 'rows.csv'), str(tmp_path / 'rows.json')
    run_viz([planted['out'], '--csv', csv_path, '--json', json_path, '--permutation', '200'],
            capsys)
    test = scipy_tests(planted)
    with open(json_path) as f:
        saved = json.load(f)
    assert saved['config'] == planted['config'] and saved['runs'] == {'full': 60, 'ablated': 60}
    assert saved['select'] == 'p' and saved['permutation_shuffles'] == 200
    with open(csv_path) as f:
        comments = [line for line in f if line.startswith('#')]
    with open(csv_path) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith('#')))
    from_comments = {line[2:].split(':', 1)[0]: json.loads(line.split(':', 1)[1])
                     for line in comments[1:]}
    assert from_comments['config'] == planted['config']
    assert from_comments['runs'] == saved['runs'] and from_comments['groups'] == saved['groups']
    assert len(rows) == len(saved['rows']) == 40
    for i, (row, js) in enumerate(zip(rows, saved['rows'])):
        assert int(row['index']) == js['index'] == planted['indices'][i]
        assert row['group'] == js['group'] == ('Random' if i < 20 else 'Easy')
        assert int(row['label']) == js['label'] == planted['labels'][i]
        for field in viz.ROW_FIELDS[3:]:
            if field == 'selected':
                assert (row[field] == 'True') == js[field] == bool(test.pvalue[i] < 0.01)
            else:
                assert float(row[field]) == float(js[field]), field  # exact: written with repr
        assert abs(js['p'] - test.pvalue[i]) < 1e-9 and abs(js['t'] - test.statistic[i]) < 1e-9


def test_plot_writes_a_png_of_the_expected_size(planted, tmp_path, capsys):
    import matplotlib.image
    path = str(tmp_path / 'figure.png')
    run_viz([planted['out'], '--plot', path], capsys)
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (500, 1200)  # 12 x 5 inches at 100 dpi, as --help says
    assert image[..., :3].std() > 0.05  # not blank


def test_viz_imports_neither_torch_nor_matplotlib_without_plot(planted):
    code = ('import sys, viz; viz.main([sys.argv[1], "--stats"]); '
            'print("torch" in sys.modules, "matplotlib" in sys.modules)')
    result = subprocess.run([sys.executable, '-c', code, planted['out']], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == 'False False'


def test_a_reader_that_stops_early_leaves_no_traceback_and_the_files_are_written(planted,
                                                                                  tmp_path):
    # `python viz.py DIR --csv F | head`: the pipe is closed here before viz.py prints anything
    out = str(tmp_path / 'rows.csv')
    proc = subprocess.Popen([sys.executable, 'viz.py', planted['out'], '--all', '--csv', out],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, stderr
    assert 'Traceback' not in stderr and 'BrokenPipe' not in stderr
    assert len(list(csv.reader(line for line in open(out) if not line.startswith('#')))) == 41


def test_side_by_side_with_nothing_selected_in_both(tmp_path, capsys):
    rng = np.random.default_rng(5)
    for k in range(2):  # no planted effect, few runs: nothing passes p < 0.01 in both
        make_experiment(str(tmp_path / f'exp{k}'), rng.normal(3, 0.5, (4, 40)),
                        rng.normal(3, 0.5, (4, 40)), seed=k)
    lines = run_viz([str(tmp_path / 'exp0'), str(tmp_path / 'exp1'), '--alpha', '1e-9'], capsys)
    agreement = [line for line in lines if line.startswith('Sign agreement')]
    assert len(agreement) == 2 and all(a.endswith('; none is selected in all') for a in agreement)


def test_side_by_side(tmp_path, capsys):
    rng = np.random.default_rng(12)
    effects_1 = np.r_[np.zeros(16), [1.0, -1.0, 1.0, -1.0], -np.ones(20)]
    effects_2 = np.r_[np.zeros(16), [1.0, 1.0, -1.0, -1.0], -np.ones(18), [1.0, 1.0]]
    made = []
    for k, effects in enumerate((effects_1, effects_2)):
        full = rng.normal(3.0, 0.5, size=(30, 40)) + effects
        ablated = rng.normal(3.0, 0.5, size=(20 + 10 * k, 40))
        made.append(make_experiment(str(tmp_path / f'exp{k}'), full, ablated,
                                    random_indices=list(range(20)), easy_indices=EASY, seed=k))
    lines = run_viz([str(tmp_path / 'exp0'), str(tmp_path / 'exp1')], capsys)
    assert lines[0].startswith(f"(1) {tmp_path / 'exp0'}: 30 full and 20 ablated runs")
    assert lines[1].startswith(f"(2) {tmp_path / 'exp1'}: 30 full and 30 ablated runs")
    diffs = np.array([m['margins']['full'].mean(0) - m['margins']['ablated'].mean(0)
                      for m in made])
    p = np.array([scipy.stats.ttest_ind(m['margins']['full'], m['margins']['ablated'],
                                        equal_var=False).pvalue for m in made])
    rows = {}
    for line in lines:
        fields = line.split()
        if fields and fields[0].isdigit():
            rows[int(fields[0])] = fields[1:]
    assert len(rows) == 40
    for i, index in enumerate(list(range(20)) + EASY):
        for k in range(2):
            cell = rows[index][k]
            assert abs(float(cell.rstrip('*')) - diffs[k, i]) < 6e-4
            assert cell.endswith('*') == (p[k, i] < 0.01)
    agreement = [line for line in lines if line.startswith('Sign agreement')]
    for group, cols in zip(agreement, (slice(0, 20), slice(20, 40))):
        same = (np.sign(diffs[0, cols]) == np.sign(diffs[1, cols])).sum()
        both = (p[:, cols] < 0.01).all(axis=0)
        both_same = (both & (np.sign(diffs[0, cols]) == np.sign(diffs[1, cols]))).sum()
        assert group.startswith(f'Sign agreement: {same} of 20 examples')
        assert group.endswith(f'{both_same} of the {both.sum()} selected in all agree'
                              if both.any() else 'none is selected in all')
    assert agreement[1].endswith('18 of the 20 selected in all agree')  # as planted
    means = [line.split()[2:] for line in lines if line.startswith('Mean (all):')]
    for k in range(2):
        assert abs(float(means[0][k]) - diffs[k, :20].mean()) < 6e-4
        assert abs(float(means[1][k]) - diffs[k, 20:].mean()) < 6e-4


def test_side_by_side_refuses_what_it_cannot_compare(tmp_path, capsys):
    full, ablated = planted_margins(runs=4)
    make_experiment(str(tmp_path / 'a'), full, ablated)
    make_experiment(str(tmp_path / 'b'), full[:, :38], ablated[:, :38])
    with pytest.raises(SystemExit, match='different examples'):
        viz.main([str(tmp_path / 'a'), str(tmp_path / 'b')])
    with pytest.raises(SystemExit):
        viz.main([str(tmp_path / 'a'), str(tmp_path / 'a'), '--csv', str(tmp_path / 'x.csv')])
    assert 'need a single experiment' in capsys.readouterr().err


def test_fewer_than_two_runs_reports_what_it_can(tmp_path, capsys):
    full, ablated = planted_margins(runs=3)
    out = str(tmp_path / 'early')
    made = make_experiment(out, full[:1], ablated)
    json_path = str(tmp_path / 'rows.json')
    lines = run_viz([out, '--all', '--stats', '--permutation', '50', '--power', '--json',
                     json_path, '--csv', str(tmp_path / 'rows.csv'),
                     '--plot', str(tmp_path / 'f.png')], capsys)
    assert ('note: an arm has fewer than 2 usable runs (complete, not diverged), so there are '
            'no p-values yet') in lines
    rows = table_rows(lines)
    assert len(rows) == 40
    i = 5
    with_, without, diff, p, rest = rows[made['indices'][i]]
    expected = made['margins']['full'][0, i] - made['margins']['ablated'][:, i].mean()
    assert abs(diff - expected) < 6e-4
    assert p == 'n/a' and rest.split() == ['[n/a,', 'n/a]', '1/3', 'n/a', 'n/a', 'n/a', 'n/a']
    assert any(line.startswith('All 20:') and '95% CI [n/a, n/a]' in line for line in lines)
    with open(json_path) as f:
        saved = json.load(f)
    assert saved['rows'][i]['p'] is None and saved['rows'][i]['n_full'] == 1
    assert os.path.getsize(str(tmp_path / 'f.png')) > 0


def test_unequal_arms_are_noted(tmp_path, capsys):
    full, ablated = planted_margins(runs=8)
    out = str(tmp_path / 'unequal')
    make_experiment(out, full[:5], ablated)
    lines = run_viz([out, '--all', '--stats'], capsys)
    assert any(line.startswith('note: the arms are unequal (5 vs 8 runs)') for line in lines)
    assert all(rest.split()[2] == '5/8' for *_, rest in table_rows(lines).values())


def test_experiment_without_labels_is_a_clear_error(tmp_path):
    full, ablated = planted_margins(runs=2)
    out = str(tmp_path / 'old')
    make_experiment(out, full, ablated)
    meta = store.read_json(os.path.join(out, 'meta.json'))
    del meta['labels']
    store.write_json_atomic(os.path.join(out, 'meta.json'), meta)
    with pytest.raises(SystemExit, match='no class labels'):
        viz.main([out])


def test_power_column_for_effects_out_of_reach(tmp_path, capsys):
    rng = np.random.default_rng(3)
    full = rng.normal(0.0, 0.3, size=(10, 4))
    ablated = full[::-1].copy()  # the same values in another order: equal means, no effect
    ablated[0, 1] += 0.005  # a mean difference of 0.0005 against variances of about 0.1
    out = str(tmp_path / 'tiny-effects')
    made = make_experiment(out, full, ablated)
    json_path = str(tmp_path / 'rows.json')
    rows = table_rows(run_viz([out, '--all', '--power', '--json', json_path], capsys))
    needed = {index: rows[index][4].strip() for index in made['indices']}
    assert needed[made['indices'][0]] == 'never'
    assert needed[made['indices'][1]] == '>1e+06'
    with open(json_path) as f:
        exported = json.load(f)['rows'][1]['runs_needed']
    a, b = made['margins']['full'][:, 1], made['margins']['ablated'][:, 1]
    z = scipy.stats.norm.isf(0.005) + scipy.stats.norm.isf(0.2)
    normal = z ** 2 * (a.var(ddof=1) + b.var(ddof=1)) / (a.mean() - b.mean()) ** 2
    assert exported > 1e6 and abs(exported - normal) <= 5  # the export keeps the number


def test_help_and_refused_flags(planted, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        viz.main(['--help'])
    assert info.value.code == 0 and '95% CI' in capsys.readouterr().out
    for flags, message in ((['--alpha', '2'], '--alpha must lie strictly between 0 and 1'),
                           (['--alpha', '0'], '--alpha must lie strictly between 0 and 1'),
                           (['--alph', '0.5'], 'unrecognized arguments: --alph'),
                           (['--permutation', '10', '--seed', '-1'], '--seed must be 0 or more'),
                           (['--plot', str(tmp_path / 'f.xyz')], 'cannot write .xyz files')):
        with pytest.raises(SystemExit):
            viz.main([planted['out'], *flags])
        assert message in capsys.readouterr().err
    for flag in ('--csv', '--json', '--plot'):  # an unwritable path: one line, no traceback
        target = str(tmp_path / 'no-such-folder' / 'out.png')
        with pytest.raises(SystemExit, match=f'error: cannot write {re.escape(target)}: '):
            viz.main([planted['out'], flag, target])
    assert not os.path.exists(tmp_path / 'f.xyz')
    with pytest.raises(SystemExit, match='is a file, not an experiment folder'):
        viz.main([os.path.join(planted['out'], 'meta.json')])


def test_accuracy_export_has_the_printed_sign(planted, tmp_path, capsys):
    json_path = str(tmp_path / 'rows.json')
    lines = run_viz([planted['out'], '--json', json_path], capsys)
    with open(json_path) as f:
        accuracy = json.load(f)['accuracy']
    full, ablated = planted['test_acc']['full'], planted['test_acc']['ablated']
    assert accuracy['removal_change'] == pytest.approx(ablated.mean() - full.mean())
    assert accuracy['ci_low'] < accuracy['removal_change'] < accuracy['ci_high']
    assert any(f"changes it by {accuracy['removal_change']:+.4f}" in line for line in lines)


def test_permutation_floor_is_stated_for_few_runs(tmp_path, capsys):
    full, ablated = planted_margins(runs=2)
    out = str(tmp_path / 'two-each')
    make_experiment(out, full, ablated)
    lines = run_viz([out, '--permutation', '1000'], capsys)
    line = next(line for line in lines if line.startswith('perm p:'))
    assert 'with 2 + 2 runs there are only 6 distinct labellings, so p cannot fall much ' \
           'below 0.33' in line
    # and the p-values themselves respect that floor
    p = viz.permutation_pvalues(full, ablated, 1000)
    assert p.min() > 0.25
