"""airbench94 training: determinism, learning the tiny task, checks on the excluded indices."""
import pytest
import torch

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


def test_excluded_indices_are_checked(tiny_data):
    for indices, message in (('[0,1,1]', 'duplicated'), ('[0,999]', 'out of range'),
                             ('[]', 'no excluded')):
        with pytest.raises(SystemExit, match=message):
            tiny_setup(tiny_data, random_indices=indices,
                       easy_indices='[]' if indices == '[]' else '[5]')
