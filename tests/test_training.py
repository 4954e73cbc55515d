"""Training: determinism, equal step counts, and the ablated arm never seeing the 40."""
import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import airbench
import trainer_airbench
from conftest import AIRBENCH_TINY, tiny_args


def tiny_setup(data_dir, **overrides):
    config = airbench.parse_config(trainer_airbench.CONFIG, trainer_airbench.PRESETS,
                                   tiny_args(data_dir, 'unused', **{**AIRBENCH_TINY, **overrides}))
    return config, airbench.prepare_data(config, torch.device('cpu'))


def train(data, config, seed, arm):
    net = airbench.train_airbench94(data, [seed], [data['arm_indices'][arm]], config,
                                    torch.device('cpu'))
    return net


def test_same_seed_same_logits(tiny_data):
    config, data = tiny_setup(tiny_data)
    logits = [airbench.predict(train(data, config, seed, 'full'), data['train_images'], 1,
                               torch.device('cpu')) for seed in (3, 3, 4)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])


def test_training_learns_the_tiny_task(tiny_data):
    config, data = tiny_setup(tiny_data, epochs=20.0)
    net = train(data, config, 0, 'full')
    logits = airbench.predict(net, data['test_images'], 1, torch.device('cpu'))
    assert airbench.accuracy(logits, data['test_labels'])[0] > 0.4  # chance is 0.1


def test_both_arms_take_the_same_number_of_optimizer_steps(tiny_data):
    config, data = tiny_setup(tiny_data, epochs=3.0, batch_size=100)
    counts = []
    hook = register_optimizer_step_post_hook(lambda *args: counts.append(1))
    try:
        per_arm = {}
        for arm in ('full', 'ablated'):
            counts.clear()
            train(data, config, 0, arm)
            per_arm[arm] = len(counts)
    finally:
        hook.remove()
    # 300 full and 296 ablated images at batch 100: drop_last on each arm's own size would give
    # 3 and 2 steps per epoch; counting from the full arm gives 3 * 3 steps in both.
    assert per_arm == {'full': 9, 'ablated': 9}


def test_ablated_arm_never_sees_the_excluded_examples(tiny_data):
    """Replace the 4 excluded images and labels by others: the ablated arm must not change at
    all (weights bit-identical, whitening init included); the full arm must."""
    config, data = tiny_setup(tiny_data)
    excluded = data['excluded']
    changed = {k: v.clone() for k, v in data.items() if isinstance(v, torch.Tensor)}
    changed['train_images'][excluded] = 255 - changed['train_images'][excluded]
    changed['train_labels'][excluded] = (changed['train_labels'][excluded] + 1) % 10
    changed = {**data, **changed}
    changed.pop('whitening', None)
    for arm, should_match in (('ablated', True), ('full', False)):
        a = train(dict(data), config, 11, arm).state_dict()
        b = train(dict(changed), config, 11, arm).state_dict()
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == should_match, arm


def test_excluded_indices_are_checked(tiny_data):
    for indices, message in (('[0,1,1]', 'duplicated'), ('[0,999]', 'out of range'),
                             ('[]', 'no excluded')):
        with pytest.raises(SystemExit, match=message):
            tiny_setup(tiny_data, random_indices=indices,
                       easy_indices='[]' if indices == '[]' else '[5]')
