"""Every shipped configuration passes its recipe's own checks on CIFAR-10's real sizes.

The trainers check their settings against the data (e.g. airbench94 whitens from at most the
images that are in both arms), and the tests' tiny datasets do not have CIFAR-10's sizes; so
without this a shipped preset could be refused only when a user runs it on the real data.
"""
import os

import pytest
import torch

import airbench
import bench
import trainer_airbench
import trainer_madry

CHECKS = {'airbench': (trainer_airbench, airbench.check_airbench94),
          'madry': (trainer_madry, trainer_madry.check_config)}
CIFAR_TRAIN_SIZE = 50000


def checked(module, check, argv):
    config = airbench.parse_config(module.CONFIG, module.PRESETS, argv)
    excluded, arm_indices = airbench.experiment_indices(config, CIFAR_TRAIN_SIZE)
    data = dict(full_size=len(arm_indices['full']),
                shared_indices=torch.tensor(arm_indices['ablated']))
    check(config, data)
    return config, data


@pytest.mark.parametrize('preset', ['default', 'smoke', 'cpu'])
@pytest.mark.parametrize('trainer', sorted(CHECKS))
def test_shipped_presets_pass_their_checks(trainer, preset):
    module, check = CHECKS[trainer]
    config, data = checked(module, check, ['--preset', preset])
    assert config['batch_size'] <= data['full_size']


@pytest.mark.parametrize('trainer', sorted(CHECKS))
def test_bench_cpu_config_passes_its_checks(trainer):
    module, check = CHECKS[trainer]
    overrides = bench.CPU_OVERRIDES[trainer]
    checked(module, check, [f'--{k.replace("_", "-")}={v}' for k, v in overrides.items()])


def test_the_check_refuses_more_whitening_images_than_both_arms_share():
    # the cpu preset's 5,000 + 40 images leave 4,980 in both arms
    with pytest.raises(SystemExit, match=r'whiten_images must lie in \[1, 4980\], got 4981'):
        checked(trainer_airbench, airbench.check_airbench94,
                ['--preset', 'cpu', '--whiten-images', '4981'])


@pytest.mark.parametrize('trainer, argv, message', [
    ('airbench', ['--widths', '[16,32]'], 'widths must be three channel counts'),
    ('airbench', ['--cutout', '-1'], r'cutout must lie in \[0, 32\]'),
    ('madry', ['--cutout-size', '33'], r'cutout_size must lie in \[0, 32\]'),
    ('madry', ['--widths', '[16,32,64]'], 'widths must be four channel counts'),
])
def test_recipe_checks_refuse_impossible_settings(trainer, argv, message):
    module, check = CHECKS[trainer]
    with pytest.raises(SystemExit, match=message):
        checked(module, check, ['--preset', 'smoke', *argv])


@pytest.mark.parametrize('argv, message', [
    (['--tta-level', '7'], 'tta-level must be 0, 1 or 2, got 7'),
    (['--lr', '0'], 'lr must be positive, got 0.0'),
    (['--momentum', '1'], r'momentum must lie in \[0, 1\), got 1.0'),
    (['--min-test-acc', '2'], r'min-test-acc must lie in \[0, 1\], got 2.0'),
])
def test_impossible_settings_are_refused_before_anything_is_written(tmp_path, argv, message):
    out = str(tmp_path / 'exp')
    for module, _ in CHECKS.values():
        with pytest.raises(SystemExit, match=message):
            module.main(['--preset', 'smoke', '--out', out, '--data-dir', str(tmp_path), *argv])
        assert not os.path.exists(out)
