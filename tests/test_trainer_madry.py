"""trainer_madry.py: the ResNet-9, its recipe and its presets (both trainers end to end: test_arms.py)."""
import os

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import airbench
import trainer_madry
from conftest import MADRY_TINY, read_meta, tiny_args

NARROW = '[4,8,8,8]'  # faster, for tests that need no accuracy


def tiny_setup(data_dir, **overrides):
    config = airbench.parse_config(trainer_madry.CONFIG, trainer_madry.PRESETS,
                                   tiny_args(data_dir, 'unused', **{**MADRY_TINY, **overrides}))
    return config, airbench.prepare_data(config, torch.device('cpu'))


def train(data, config, seed, arm):
    return trainer_madry.train_madry(data, [seed], [data['arm_indices'][arm]], config,
                                     torch.device('cpu'))


def test_parameter_count_at_full_width():
    conv = lambda c_in, c_out, k: c_in * c_out * k * k
    convs = (conv(3, 64, 3) + conv(64, 128, 5) + 2 * conv(128, 128, 3) + conv(128, 256, 3)
             + 2 * conv(256, 256, 3) + conv(256, 128, 3))
    batchnorms = 2 * (64 + 128 + 2 * 128 + 256 + 2 * 256 + 128)  # a weight and a bias each
    linear = 128 * 10  # no bias
    expected = convs + batchnorms + linear
    assert expected == 2_274_880  # "about 2.27 M"
    for models in (1, 3):
        net = trainer_madry.resnet9(models, trainer_madry.WIDTHS)
        assert sum(p.numel() for p in net.parameters()) == models * expected
        assert not any(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))


def test_lr_schedule_of_the_full_recipe_at_known_steps():
    # 50,000 images in the full arm (the 40 are among them) at batch 512: 97 steps per epoch,
    # 24 * 97 steps, peak at 5 * 97.
    steps = airbench.total_steps(trainer_madry.EPOCHS, 50000, trainer_madry.BATCH_SIZE)
    assert steps == 2328
    peak = trainer_madry.LR_PEAK_EPOCH * (50000 // trainer_madry.BATCH_SIZE)
    lr = lambda step: trainer_madry.LR * trainer_madry.lr_multiplier(step, steps, peak)
    assert lr(0) == 0.0
    assert lr(97) == pytest.approx(0.1)                  # epoch 1 of the 5-epoch warm-up
    assert lr(485) == pytest.approx(0.5)                 # the peak
    assert lr(1406) == pytest.approx(0.5 * 922 / 1843)   # halfway down: 1843 steps from 485
    assert lr(2327) == pytest.approx(0.5 / 1843)         # the last step
    assert max(lr(s) for s in range(steps)) == lr(485)


def test_optimizer_uses_the_triangle_per_iteration(tiny_data):
    # 300 images at batch 50: 6 steps per epoch; 4 epochs = 24 steps; peak at step 6.
    config, data = tiny_setup(tiny_data, epochs=4.0, lr_peak_epoch=1.0, lr=0.5, widths=NARROW)
    seen = []

    def record(optimizer, args, kwargs):
        group = optimizer.param_groups[0]
        seen.append((group['lr'], group['momentum'], group['nesterov'], group['weight_decay']))

    hook = register_optimizer_step_post_hook(record)
    try:
        train(data, config, 0, 'full')
    finally:
        hook.remove()
    expected = [0.5 * min(s / 6, (24 - s) / 18) for s in range(24)]
    assert [s[0] for s in seen] == pytest.approx(expected)
    assert {s[1:] for s in seen} == {(0.9, False, 5e-4)}


def test_k_wide_net_is_k_single_nets_side_by_side():
    widths = [4, 8, 8, 8]
    make = lambda models: trainer_madry.resnet9(models, widths)
    wide = airbench.build_models(make, [5, 6])
    singles = []
    for seed in (5, 6):
        torch.manual_seed(seed)
        singles.append(make(1))
    for name, w in wide.state_dict().items():
        if w.ndim:  # every parameter and BatchNorm statistic: model k is the k-th block of rows
            for k, single in enumerate(singles):
                part = w.view(2, -1, *w.shape[1:])[k]
                assert torch.equal(part, single.state_dict()[name]), (name, k)
    assert not torch.equal(singles[0][0].weight, singles[1][0].weight)
    # And the models do not mix: in training mode (BatchNorm on batch statistics) each model's
    # output is its single net's output on its own input.
    x = torch.randn(8, 6, 32, 32)
    out = wide(x)
    assert out.shape == (8, 2, 10)
    for k, single in enumerate(singles):
        torch.testing.assert_close(out[:, k], single(x[:, 3 * k:3 * k + 3])[:, 0],
                                   rtol=1e-4, atol=1e-5)


def test_augmentation_follows_the_cutout_switch(tiny_data, monkeypatch):
    calls = []
    original = airbench.augment
    monkeypatch.setattr(airbench, 'augment', lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    for cutout, size in ((True, 4), (False, 0)):
        config, data = tiny_setup(tiny_data, cutout=cutout, epochs=0.2, lr_peak_epoch=0.1,
                                  widths=NARROW)
        calls.clear()
        train(data, config, 0, 'full')
        assert calls and all(kw == dict(flip=True, translate=2, cutout=size, pad_mode='constant')
                             for kw in calls)


def test_without_cutout_the_default_folder_is_madry_nocutout(tiny_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for cutout, folder in (('False', 'madry_nocutout_smoke'), ('True', 'madry_smoke')):
        trainer_madry.main(tiny_args(tiny_data, '', runs=1, preset='smoke', cutout=cutout,
                                     epochs=0.2, lr_peak_epoch=0.1, widths=NARROW))
        meta = read_meta(os.path.join('logits', folder))
        assert meta['config']['cutout'] is (cutout == 'True')
        assert meta['config']['out'] == os.path.join('logits', folder)


def test_presets_and_a_bad_lr_peak_are_checked_before_anything_is_written(tiny_data, tmp_path):
    for preset in ('default', *trainer_madry.PRESETS):
        config = airbench.parse_config(trainer_madry.CONFIG, trainer_madry.PRESETS,
                                       ['--preset', preset])
        assert 0 < config['lr_peak_epoch'] < config['epochs'], preset
    out = str(tmp_path / 'exp')
    with pytest.raises(SystemExit, match='lr_peak_epoch must lie strictly between'):
        trainer_madry.main(tiny_args(tiny_data, out, widths=NARROW, lr_peak_epoch=2.0))
    assert not os.path.exists(out)
