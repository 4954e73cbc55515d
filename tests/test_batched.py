"""K models at once (grouped convolutions) and the compile fallback."""
import pytest
import torch

import airbench
import trainer_airbench
from conftest import AIRBENCH_TINY, tiny_args


def tiny_setup(data_dir, **overrides):
    config = airbench.parse_config(trainer_airbench.CONFIG, trainer_airbench.PRESETS,
                                   tiny_args(data_dir, 'unused', **{**AIRBENCH_TINY, **overrides}))
    return config, airbench.prepare_data(config, torch.device('cpu'))


def test_k_models_at_once_equal_k_sequential_trainings(tiny_data):
    config, data = tiny_setup(tiny_data, epochs=3.0)
    cpu = torch.device('cpu')
    seeds = [5, 6, 7]
    arms = ['full', 'ablated', 'full']
    indices = [data['arm_indices'][arm] for arm in arms]
    together = airbench.train_airbench94(data, seeds, indices, config, cpu)
    logits_together = airbench.predict(together, data['train_images'], 3, cpu)
    for k, (seed, idx) in enumerate(zip(seeds, indices)):
        alone = airbench.train_airbench94(data, [seed], [idx], config, cpu)
        logits_alone = airbench.predict(alone, data['train_images'], 1, cpu)[0]
        # Same maths, different summation order in grouped convolutions: float tolerance.
        torch.testing.assert_close(logits_together[k], logits_alone, atol=1e-4, rtol=1e-4)
        # and the models really differ from each other
        assert not torch.allclose(logits_together[k], logits_together[(k + 1) % 3], atol=0.1)


def test_build_models_stacks_seeded_single_models():
    make = lambda models: airbench.airbench94(models, (4, 8, 8))
    freeze_whitening = lambda net: net[0].weight.requires_grad_(False)
    wide_net = airbench.build_models(make, [1, 2], freeze_whitening)
    assert [p.requires_grad for p in wide_net.parameters()] == \
        [p.requires_grad for p in airbench.build_models(make, [1], freeze_whitening).parameters()]
    assert not wide_net[0].weight.requires_grad and not wide_net[4].weight.requires_grad
    wide = wide_net.state_dict()
    for k, seed in enumerate([1, 2]):
        single = airbench.build_models(make, [seed]).state_dict()
        for name, value in single.items():
            if value.ndim:
                rows = len(value)
                assert torch.equal(wide[name][k * rows:(k + 1) * rows], value), name


def test_eager_fallback_when_compile_is_unavailable(tiny_data, monkeypatch, capsys):
    def broken_compile(module, *args, **kwargs):
        def fail(*a, **kw):
            raise RuntimeError('no C++ compiler on this machine')
        return fail
    monkeypatch.setattr(torch, 'compile', broken_compile)
    monkeypatch.setattr(airbench, '_EAGER_ONLY', [])
    config, data = tiny_setup(tiny_data, compile='on')
    cpu = torch.device('cpu')
    capsys.readouterr()
    net = airbench.train_airbench94(data, [3], [data['arm_indices']['full']], config, cpu)
    again = airbench.train_airbench94(data, [3], [data['arm_indices']['full']], config, cpu)
    notes = capsys.readouterr().err.count('torch.compile failed')
    assert notes == 1  # said once, not once per call or per training
    config_off = dict(config, compile='off')
    eager = airbench.train_airbench94(data, [3], [data['arm_indices']['full']], config_off, cpu)
    for a, b, c in zip(net.state_dict().values(), again.state_dict().values(),
                       eager.state_dict().values()):
        assert torch.equal(a, c) and torch.equal(b, c)


@pytest.mark.slow
def test_compiled_training_matches_eager(tiny_data, monkeypatch):
    """torch.compile really runs here (about a minute of compilation on 2 cores)."""
    monkeypatch.setattr(airbench, '_EAGER_ONLY', [])
    config, data = tiny_setup(tiny_data, compile='on')
    cpu = torch.device('cpu')
    compiled = airbench.train_airbench94(data, [3], [data['arm_indices']['full']], config, cpu)
    assert not airbench._EAGER_ONLY, airbench._EAGER_ONLY
    eager = airbench.train_airbench94(data, [3], [data['arm_indices']['full']],
                                      dict(config, compile='off'), cpu)
    torch.testing.assert_close(airbench.predict(compiled, data['train_images'], 1, cpu),
                               airbench.predict(eager, data['train_images'], 1, cpu),
                               atol=2e-3, rtol=2e-3)
