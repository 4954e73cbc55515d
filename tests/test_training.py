"""airbench94 training: determinism, learning the tiny task, the recipe step by step, checks on
the excluded indices."""
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


def test_excluded_indices_are_checked(tiny_data):
    for indices, message in (('[0,1,1]', 'duplicated'), ('[0,999]', 'out of range'),
                             ('[]', 'no excluded')):
        with pytest.raises(SystemExit, match=message):
            tiny_setup(tiny_data, random_indices=indices,
                       easy_indices='[]' if indices == '[]' else '[5]')


def test_airbench94_recipe_step_by_step(tiny_data, monkeypatch):
    """The published settings, step by step: lr and weight decay per group in airbench's units,
    Nesterov momentum 0.85, the whitening bias trained for its first epochs only, the lookahead
    pulls, and the initial state (zero whitening bias, BatchNorm weights frozen at 1)."""
    config, data = tiny_setup(tiny_data, epochs=4.0)  # 300 images at batch 50: 6 steps an epoch
    steps, whiten_bias_steps = 24, 18                 # 3 epochs of the whitening bias
    assert (config['lr'], config['momentum'], config['weight_decay'], config['bias_lr_scale'],
            config['label_smoothing']) == (11.5, 0.85, 0.0153, 64.0, 0.0)
    fresh = airbench.airbench94(1, [4, 8, 8])
    assert torch.equal(fresh[0].bias, torch.zeros(24))
    bns = [m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(torch.equal(m.weight, torch.ones_like(m.weight))
                                 and not m.weight.requires_grad for m in bns)
    assert all((m.momentum, m.eps) == (0.4, 1e-12) for m in bns)

    seen, decays = [], []
    record = lambda opt, args, kwargs: seen.append(
        [(g['lr'], g['weight_decay'], g['momentum'], g['nesterov'], len(g['params']))
         for g in opt.param_groups])
    original_update = airbench.Lookahead.update
    monkeypatch.setattr(airbench.Lookahead, 'update',
                        lambda self, decay: decays.append(decay) or original_update(self, decay))
    hook = register_optimizer_step_post_hook(record)
    try:
        net = train(data, config, 0, 'full')
    finally:
        hook.remove()
    assert not net[0].weight.requires_grad  # the whitening filters stay as computed

    kilostep = 1024 * (1 + 1 / (1 - 0.85))  # airbench's units: per 1024 examples, with momentum
    lr, wd = 11.5 / kilostep, 0.0153 * 50 / kilostep
    peak = int(0.23 * steps)
    assert len(seen) == steps
    for step, groups in enumerate(seen):
        ramp = 0.2 + 0.8 * step / peak if step <= peak else 1 - 0.93 * (step - peak) / (steps - peak)
        (bn_lr, bn_wd, *bn_rest), (lr_, wd_, *rest), (wb_lr, wb_wd, *wb_rest) = groups
        assert bn_lr == pytest.approx(64 * lr * ramp) and bn_wd == pytest.approx(wd / (64 * lr))
        assert lr_ == pytest.approx(lr * ramp) and wd_ == pytest.approx(wd / lr)
        assert wb_lr == pytest.approx(lr * ramp if step < whiten_bias_steps else 0.0)
        assert wb_wd == pytest.approx(wd / lr)
        assert bn_rest == [0.85, True, 6] and rest[:2] == [0.85, True] and wb_rest == [0.85, True, 1]
    # Lookahead every 5 steps with decay 0.95^5 (step/steps)^3, then once more with decay 1:
    # the final weights are the averaged ones.
    assert decays == pytest.approx([0.95 ** 5 * (s / steps) ** 3 for s in (5, 10, 15, 20)] + [1.0])
