"""Negative self-influence with a ResNet-9: the same experiment as trainer_airbench.py (RUNS models
on all of CIFAR-10, "full", and RUNS on the same set minus 40 fixed examples, "ablated"), with a
quite different recipe: the KakaoBrain/Myrtle ResNet-9 as trained in MadryLab's datamodels
CIFAR-10 example (plain SGD on a triangular learning rate, no lookahead, no whitening layer).
If negative self-influence shows here too, it is not an artefact of airbench's recipe.

    python trainer_madry.py                      # 1000 + 1000 trainings, on a CUDA GPU
    python trainer_madry.py --preset cpu         # a CPU-scale version (under an hour on 2 cores)
    python trainer_madry.py --cutout False       # the same without cutout, in logits/madry_nocutout
    python viz.py logits/madry

Every constant below can also be set from the command line (--help lists them). Rerunning the
same command resumes; changing a setting of an existing experiment is refused.
Only the network and the recipe are here; data, loader, training loop, evaluation and the store
are airbench.py's.
"""
import numpy as np
import torch
import torch.nn as nn

import airbench

# -----------------------------------------------------------------------------
# The experiment (as in trainer_airbench.py)
RUNS = 1000               # trainings per arm
RANDOM_INDICES = list(range(20))   # 20 random training examples (indices into CIFAR-10 train)
EASY_INDICES = [45114, 47798, 43746, 49106, 47082, 44095, 49524, 41014, 49159, 44279,
                45927, 40141, 47731, 46440, 49015, 49690, 46836, 43512, 43189, 49320]  # easy ones
TRAIN_SUBSET = 0          # 0: train on all 50,000 images; n: on the first n images plus the 40
SEED = 0                  # run r of the full arm uses seed SEED + 2r, of the ablated arm SEED + 2r + 1
OUT = ''                  # '' means logits/madry (or logits/madry_nocutout), plus _<preset>
DATA_DIR = 'data'         # holds cifar-10-batches-py/ or cifar-10-python.tar.gz (else downloads)
DEVICE = ''               # '' means cuda if available, else cpu
MODELS_PER_DEVICE = 1     # models trained at once, side by side in one network (see bench.py)
COMPILE = 'auto'          # torch.compile: 'auto' (on CUDA only), 'on' or 'off' (see bench.py)
MIN_TEST_ACC = 0.2        # a run with lower test accuracy (chance is 0.1) is recorded as diverged
PRESET = 'default'

# -----------------------------------------------------------------------------
# The recipe: ResNet-9 as in MadryLab's datamodels CIFAR-10 example
EPOCHS = 24.0             # in steps of the full arm: ceil(24 * (50000 // 512)) = 2328 steps
BATCH_SIZE = 512          # images per step
LR = 0.5                  # peak learning rate; the loss is each model's mean over its batch
LR_PEAK_EPOCH = 5.0       # the lr rises linearly from 0 to LR here, then falls to 0 at the end
MOMENTUM = 0.9            # heavy-ball (not Nesterov)
WEIGHT_DECAY = 5e-4       # PyTorch SGD's, on every parameter (BatchNorm included)
LABEL_SMOOTHING = 0.0     # off: margins need unclipped confidence
WIDTHS = [64, 128, 256, 128]  # channels: stem, stage 1 (and its residual block), stage 2, last conv
BN_MOMENTUM = 0.1         # PyTorch's default convention: running statistics move 10% per step
FLIP = True               # random horizontal flips
ALTERNATE_FLIP = False    # a fresh random flip at every draw, as the example's RandomHorizontalFlip
TRANSLATE = 2             # random translation by up to this many pixels (border: the mean colour)
CUTOUT = True             # blank a random CUTOUT_SIZE square (to the mean colour); False: no
                          # cutout, and the default folder is logits/madry_nocutout
CUTOUT_SIZE = 4           # side of that square in pixels (used only when CUTOUT is True)
TTA_LEVEL = 1             # for the test accuracy: 0 none, 1 mirror (as the datamodels example)

CONFIG = {k.lower(): v for k, v in dict(globals()).items() if k.isupper()}

PRESETS = {
    # Two runs per arm on all 50,000 images, to check the pipeline end to end in ~3 CPU minutes.
    'smoke': dict(runs=2, widths=[8, 16, 32, 16], epochs=1.0, lr_peak_epoch=0.25,
                  tta_level=0),
    # The experiment at CPU scale: a quarter-width net on the first 5000 images plus the 40
    # (underfit models memorise too little for the random examples' positive self-influence to
    # show: at an eighth of the width the net fitted only 76% of its training images, at a
    # quarter 80% after 20 epochs; see README.md). Compiled: on 2 cores torch.compile costs
    # ~30 s once and then trains ~1.4x faster.
    'cpu': dict(runs=16, train_subset=5000, widths=[16, 32, 64, 32], epochs=30.0,
                lr_peak_epoch=6.0, batch_size=256, tta_level=0, compile='on'),
}


# -----------------------------------------------------------------------------
# The network

class Residual(nn.Module):
    """x + block(x): no activation after the sum, as in the Myrtle ResNet-9."""

    def __init__(self, *layers):
        super().__init__()
        self.block = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.block(x)


def resnet9(models=1, widths=(64, 128, 256, 128), bn_momentum=0.1):
    """The KakaoBrain/Myrtle ResNet-9, K = `models` copies side by side (grouped convolutions,
    per-model BatchNorm channels). PyTorch's default initialisation; the 1x1 head conv is
    initialised like a bias-free nn.Linear(widths[3], 10)."""
    stem, c1, c2, c3 = widths

    def conv_bn(c_in, c_out, kernel=3, **kw):
        return [airbench.conv(c_in, c_out, kernel, models, **kw),
                nn.BatchNorm2d(c_out * models, momentum=bn_momentum), nn.ReLU()]

    return nn.Sequential(
        *conv_bn(3, stem),                              # 32x32
        *conv_bn(stem, c1, 5, stride=2, padding=2),     # 16x16
        Residual(*conv_bn(c1, c1), *conv_bn(c1, c1)),
        *conv_bn(c1, c2), nn.MaxPool2d(2),              # 8x8
        Residual(*conv_bn(c2, c2), *conv_bn(c2, c2)),
        *conv_bn(c2, c3, padding=0),                    # 6x6
        nn.AdaptiveMaxPool2d(1),
        airbench.conv(c3, 10, 1, models, padding=0),    # the linear layer, per model
        airbench.Head(models, 0.2))


# -----------------------------------------------------------------------------
# The recipe

def lr_multiplier(step, steps, peak_step):
    """The triangle: 0 at step 0, 1 at peak_step, 0 at `steps` (one past the last step)."""
    return float(np.interp(step, [0, peak_step, steps], [0.0, 1.0, 0.0]))


def cutout_size(config):
    """The side of the cutout square: CUTOUT_SIZE, or 0 (none) when CUTOUT is off."""
    return config['cutout_size'] if config['cutout'] else 0


def check_config(config, data=None):
    """Settings this recipe cannot train with: a learning-rate peak outside the training (the
    triangle would be malformed), not four widths, or a cutout square that does not fit."""
    if not 0 <= config['cutout_size'] <= 32:
        raise SystemExit(f'error: cutout_size must lie in [0, 32] pixels, got '
                         f'{config["cutout_size"]}')
    if len(config['widths']) != 4:
        raise SystemExit(f'error: widths must be four channel counts (stem, stage 1, stage 2, '
                         f'last conv), got {config["widths"]}')
    if not 0 < config['lr_peak_epoch'] < config['epochs']:
        raise SystemExit(f'error: lr_peak_epoch must lie strictly between 0 and epochs '
                         f'({config["epochs"]}), got {config["lr_peak_epoch"]}')


def train_madry(data, seeds, train_indices, config, device, on_step=None):
    """Train len(seeds) ResNet-9s at once; model k uses seeds[k] and train_indices[k].

    data: dict from `airbench.prepare_data`. Returns the K-wide network after the last step.
    """
    check_config(config)
    make = lambda models: resnet9(models, config['widths'], config['bn_momentum'])
    net = airbench.build_models(make, seeds).to(device, memory_format=torch.channels_last)
    # Epochs in steps of the full arm, as total_steps counts them, so both arms share the schedule.
    peak_step = config['lr_peak_epoch'] * (data['full_size'] // config['batch_size'])
    optimizer = torch.optim.SGD([dict(params=net.parameters(), base_lr=config['lr'])],
                                lr=config['lr'], momentum=config['momentum'], nesterov=False,
                                weight_decay=config['weight_decay'])
    airbench.run_training(net, optimizer, data, seeds, train_indices,
                          dict(config, cutout=cutout_size(config)), device,
                          schedule=lambda step, steps: lr_multiplier(step, steps, peak_step),
                          reduction='mean', pad_mode='constant', on_step=on_step)
    return net


def main(argv=None):
    name = lambda config: 'madry' if config['cutout'] else 'madry_nocutout'
    return airbench.run_experiment(name, CONFIG, PRESETS, train_madry,
                                   [__file__, airbench.__file__, airbench.store.__file__],
                                   argv, __doc__, check=check_config)


if __name__ == '__main__':
    main()
