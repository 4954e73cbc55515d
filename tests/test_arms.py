"""Both trainers, both arms: equal optimizer step counts, the ablated arm never seeing the 40
excluded examples (not through the data, the labels, or a data-dependent initialisation), and a
run end to end on a tiny dataset in the official layout, then viz.py."""
import os

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import airbench
import trainer_airbench
import trainer_madry
import viz
from conftest import AIRBENCH_TINY, MADRY_TINY, read_meta, tiny_args

TRAINERS = {
    'airbench': (trainer_airbench, airbench.train_airbench94, AIRBENCH_TINY),
    'madry': (trainer_madry, trainer_madry.train_madry,
              dict(widths='[4,8,8,8]', lr_peak_epoch=0.5)),
}
# End to end: flags that make each trainer learn the tiny data, and the test accuracy its runs
# must then beat (airbench's 2-epoch tiny runs are far from converged; test_training.py checks
# that it learns).
END_TO_END = {'airbench': (AIRBENCH_TINY, 0.0), 'madry': (MADRY_TINY, 0.2)}


def setup(name, data_dir, **overrides):
    module, train_fn, tiny = TRAINERS[name]
    config = airbench.parse_config(module.CONFIG, module.PRESETS,
                                   tiny_args(data_dir, 'unused', **{**tiny, **overrides}))
    data = airbench.prepare_data(config, torch.device('cpu'))
    train = lambda data, seed, arm: train_fn(data, [seed], [data['arm_indices'][arm]], config,
                                             torch.device('cpu'))
    return data, train


@pytest.mark.parametrize('name', TRAINERS)
def test_both_arms_take_the_same_number_of_optimizer_steps(name, tiny_data):
    data, train = setup(name, tiny_data, epochs=3.0, batch_size=100)
    counts = []
    hook = register_optimizer_step_post_hook(lambda *args: counts.append(1))
    try:
        per_arm = {}
        for arm in ('full', 'ablated'):
            counts.clear()
            train(data, 0, arm)
            per_arm[arm] = len(counts)
    finally:
        hook.remove()
    # 300 full and 296 ablated images at batch 100: drop_last on each arm's own size would give
    # 3 and 2 steps per epoch; counting from the full arm gives 3 * 3 steps in both.
    assert (data['full_size'], len(data['arm_indices']['ablated'])) == (300, 296)
    assert per_arm == {'full': 9, 'ablated': 9}


@pytest.mark.parametrize('name', TRAINERS)
def test_ablated_arm_never_sees_the_excluded_examples(name, tiny_data):
    """Replace the 4 excluded images and labels by others: the ablated arm must not change at
    all (weights and BatchNorm statistics bit-identical, airbench's whitening init included);
    the full arm must."""
    data, train = setup(name, tiny_data)
    excluded = data['excluded']
    changed = {k: v.clone() for k, v in data.items() if isinstance(v, torch.Tensor)}
    changed['train_images'][excluded] = 255 - changed['train_images'][excluded]
    changed['train_labels'][excluded] = (changed['train_labels'][excluded] + 1) % 10
    changed = {**data, **changed}
    for key in [k for k in changed if k.startswith('whitening')]:
        del changed[key]  # recomputed from the changed images, where a recipe has one
    for arm, should_match in (('ablated', True), ('full', False)):
        a = train(dict(data), 11, arm).state_dict()
        b = train(dict(changed), 11, arm).state_dict()
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == should_match, arm


@pytest.mark.parametrize('name', TRAINERS)
def test_end_to_end_then_viz(name, tiny_data, tmp_path, capsys):
    module = TRAINERS[name][0]
    flags, min_acc = END_TO_END[name]
    out = str(tmp_path / 'exp')
    argv = tiny_args(tiny_data, out, runs=2, **flags)
    module.main(argv)
    for arm in ('full', 'ablated'):
        logits = np.load(os.path.join(out, f'{arm}.npy'), mmap_mode='r')
        assert logits.shape == (2, 300, 10) and logits.dtype == np.float16
        assert np.isfinite(logits).all() and np.abs(logits).sum(axis=(1, 2)).min() > 0
    meta = read_meta(out)
    # The whole config is saved with the results, exactly as the flags made it.
    assert meta['config'] == airbench.parse_config(module.CONFIG, module.PRESETS, argv)
    assert meta['config']['random_indices'] == [0, 1] and meta['config']['runs'] == 2
    for arm, offset in (('full', 0), ('ablated', 1)):
        rows = meta['rows'][arm]
        assert [r['slot'] for r in rows] == [0, 1] and all(r['complete'] for r in rows)
        assert [r['seed'] for r in rows] == [offset, 2 + offset]
        assert all(min_acc < r['test_acc'] <= 1 and r['seconds'] > 0 and r['status'] == 'ok'
                   for r in rows)
    assert meta['sessions'][0]['torch'] and meta['sessions'][0]['source']
    assert os.path.isdir(os.path.join(out, 'source', meta['sessions'][0]['source']))

    capsys.readouterr()
    viz.main([out, '--all'])
    printed = capsys.readouterr().out
    assert '2 full and 2 ablated runs' in printed
    lines = printed.splitlines()
    start = lines.index('Random examples:')
    assert [line.split()[0] for line in lines[start:start + 12]] == \
        ['Random', '0', '1', 'Average:', 'All', 'Significant:',
         'Easy', '2', '3', 'Average:', 'All', 'Significant:']
