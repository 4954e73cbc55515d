"""bench.py: its table on the CPU, and the synthetic full-size experiment for viz.py."""
import re

import numpy as np
import pytest
import torch

import airbench
import bench
import store
import trainer_madry
import viz

TINY = dict(random_indices=[0, 1], easy_indices=[2, 3], epochs=2.0, batch_size=50, tta_level=0)


def test_bench_prints_its_table_on_the_cpu(tiny_data, monkeypatch, capsys):
    monkeypatch.setattr(bench, 'CPU_OVERRIDES', {
        'airbench': dict(TINY, widths=[4, 8, 8], whiten_images=100),
        'madry': dict(TINY, widths=[4, 8, 8, 8], lr_peak_epoch=0.5)})
    # torch.compile takes minutes on 2 cores: here it "fails", which exercises the fallback
    monkeypatch.setattr(torch, 'compile', lambda net: (_ for _ in ()).throw(RuntimeError('no')))
    monkeypatch.setattr(bench.airbench, '_EAGER_ONLY', [])
    monkeypatch.setattr(bench, 'paths', lambda device: [('eager, 1 at a time', 1, 'off'),
                                                        ('compiled, 1 at a time', 1, 'on'),
                                                        ('eager, 2 at once', 2, 'off')])
    bench.main(['--device', 'cpu', '--data-dir', tiny_data])
    printed = capsys.readouterr().out
    table = printed[printed.index('trainer  path'):]
    for trainer in ('airbench', 'madry'):
        rows = [line for line in table.splitlines() if line.startswith(trainer)]
        assert len(rows) == 3 + (trainer == 'airbench')  # + the airbench package peer
        for row in rows:
            if 'not run' in row:
                continue
            seconds, per_hour, acc, ratio, infer, first = row.split()[-6:]
            # seconds are printed to 0.01 s: per hour must lie in the range that rounding allows
            low, high = float(seconds) - 0.005, float(seconds) + 0.005
            assert 3600 / high - 1 <= float(per_hour) <= 3600 / low + 1
            assert 0 <= float(acc) <= 1 and 0 < float(infer.rstrip('%')) < 100
            assert (first == '-') == ('eager' in row)  # compiled paths report their warm-up
        assert rows[0].split()[-3] == '1.00x'  # the reference
        if trainer == 'airbench':
            assert rows[-1].split(None, 1)[1].split() == 'PyPI train94 (no infer) not run: needs CUDA'.split()


def test_synthetic_arms_are_a_readable_experiment(tmp_path):
    out = str(tmp_path / 'exp')
    bench.write_synthetic_arms(out, runs=12)
    exp = viz.load(out)
    for arm in store.ARMS:
        assert len(exp['runs'][arm]) == 12
        assert exp['margins'][arm].shape == (12, 40) and np.isfinite(exp['margins'][arm]).all()
        assert np.load(f'{out}/{arm}.npy', mmap_mode='r').shape == (12, 50000, 10)
    # the 40 columns vary between runs, so the statistics are not degenerate
    assert exp['margins']['full'].std(axis=0).min() > 0.1


@pytest.mark.slow
def test_viz_at_full_size(capsys):
    bench.main(['--viz'])
    printed = capsys.readouterr().out
    seconds = float(re.search(r'second \(warm cache\) run: ([\d.]+) s', printed)[1])
    peak = float(re.search(r'second \(warm cache\) run: [\d.]+ s, peak memory (\d+) MiB', printed)[1])
    assert seconds <= 3.0 and peak <= 1024


def test_cpu_overrides_make_valid_shortened_presets():
    for name, (module, _) in bench.TRAINERS.items():
        overrides = bench.CPU_OVERRIDES[name]
        config = airbench.parse_config(module.CONFIG, module.PRESETS,
                                       [f'--{k.replace("_", "-")}={v}' for k, v in overrides.items()])
        preset = airbench.parse_config(module.CONFIG, module.PRESETS, ['--preset', 'cpu'])
        assert config['preset'] == 'cpu' and config['epochs'] < preset['epochs']
        if name == 'madry':  # the lr peak moved with the shorter training, at the same share
            trainer_madry.check_config(config)
            assert config['lr_peak_epoch'] / config['epochs'] == pytest.approx(
                preset['lr_peak_epoch'] / preset['epochs'])
