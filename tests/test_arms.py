"""Both trainers, both arms: equal optimizer step counts, and the ablated arm never seeing the 40
excluded examples (not through the data, the labels, or a data-dependent initialisation)."""
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import airbench
import trainer_airbench
import trainer_madry
from conftest import AIRBENCH_TINY, tiny_args

TRAINERS = {
    'airbench': (trainer_airbench, airbench.train_airbench94, AIRBENCH_TINY),
    'madry': (trainer_madry, trainer_madry.train_madry,
              dict(widths='[4,8,8,8]', lr_peak_epoch=0.5)),
}


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
    changed.pop('whitening', None)  # recomputed from the changed images, where a recipe has one
    for arm, should_match in (('ablated', True), ('full', False)):
        a = train(dict(data), 11, arm).state_dict()
        b = train(dict(changed), 11, arm).state_dict()
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == should_match, arm
