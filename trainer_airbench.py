"""Negative self-influence with airbench94: train RUNS models on all of CIFAR-10 ("full") and RUNS
on the same set minus 40 fixed examples ("ablated"), and save every model's logits on all
training images. Then `python viz.py` compares the 40 examples' margins between the arms.

    python trainer_airbench.py                   # 1000 + 1000 trainings, on a CUDA GPU
    python trainer_airbench.py --preset cpu      # a CPU-scale version (under an hour on 2 cores)
    python trainer_airbench.py --runs 50 --out logits/try

Every constant below can also be set from the command line (--help lists them). Rerunning the
same command resumes; changing a setting of an existing experiment is refused.
"""
import airbench

# -----------------------------------------------------------------------------
# The experiment
RUNS = 1000               # trainings per arm
RANDOM_INDICES = list(range(20))   # 20 random training examples (indices into CIFAR-10 train)
EASY_INDICES = [45114, 47798, 43746, 49106, 47082, 44095, 49524, 41014, 49159, 44279,
                45927, 40141, 47731, 46440, 49015, 49690, 46836, 43512, 43189, 49320]  # easy ones
TRAIN_SUBSET = 0          # 0: train on all 50,000 images; n: on the first n images plus the 40
SEED = 0                  # run r of the full arm uses seed SEED + 2r, of the ablated arm SEED + 2r + 1
OUT = ''                  # '' means logits/airbench, or logits/airbench_<preset>
DATA_DIR = 'data'         # holds cifar-10-batches-py/ or cifar-10-python.tar.gz (else downloads)
DEVICE = ''               # '' means cuda if available, else cpu
MODELS_PER_DEVICE = 1     # models trained at once, side by side in one network (see bench.py)
COMPILE = 'auto'          # torch.compile: 'auto' (on CUDA only), 'on' or 'off' (see bench.py)
MIN_TEST_ACC = 0.2        # a run with lower test accuracy (chance is 0.1) is recorded as diverged
PRESET = 'default'

# -----------------------------------------------------------------------------
# The recipe: Keller Jordan's airbench94, without label smoothing
EPOCHS = 9.9              # in steps of the full arm: ceil(9.9 * (50000 // 1024)) = 476 steps
BATCH_SIZE = 1024         # images per step
LR = 11.5                 # per 1024 examples, airbench's units (the loss is a sum over the batch)
MOMENTUM = 0.85           # Nesterov
WEIGHT_DECAY = 0.0153     # per 1024 examples, airbench's units
BIAS_LR_SCALE = 64.0      # BatchNorm biases learn this much faster (their weights are frozen at 1)
LABEL_SMOOTHING = 0.0     # off: margins need unclipped confidence (airbench94 uses 0.2)
WHITEN_BIAS_EPOCHS = 3.0  # the whitening layer's bias trains for this many epochs only
WHITEN_IMAGES = 5000      # images (the first of those in both arms) whose 2x2-patch statistics
                          # initialise the whitening layer
WIDTHS = [64, 256, 256]   # channels of the three conv groups
BN_MOMENTUM = 0.4         # PyTorch's convention (airbench's 0.6)
EMA_EVERY = 5             # lookahead: steps between pulls towards the average
EMA_RATE = 0.95           # per step; the pull is EMA_RATE**EMA_EVERY * (step/steps)**3
FLIP = True               # random horizontal flips
ALTERNATE_FLIP = True     # each image's flip alternates pass by pass (airbench); False: fresh each draw
TRANSLATE = 2             # random translation by up to this many pixels (reflect-padded)
CUTOUT = 0                # side of a zeroed square, 0 for none
TTA_LEVEL = 2             # for the test accuracy: 0 none, 1 mirror, 2 mirror + 1-pixel translations

CONFIG = {k.lower(): v for k, v in dict(globals()).items() if k.isupper()}

PRESETS = {
    # Two runs per arm on all 50,000 images, to check the pipeline end to end in ~2 CPU minutes.
    'smoke': dict(runs=2, widths=[16, 32, 32], epochs=1.0, batch_size=500, tta_level=0),
    # The experiment at CPU scale: see README.md for why it trains on a subset.
    # Compiled: on 2 cores torch.compile costs ~1 minute once and then trains ~1.2x faster.
    # whiten_images: all 4,980 images in both arms (the 5,020 minus the 40).
    'cpu': dict(runs=16, train_subset=5000, widths=[16, 64, 64], epochs=30.0, batch_size=250,
                whiten_images=4980, tta_level=0, compile='on'),
}


def main(argv=None):
    return airbench.run_experiment('airbench', CONFIG, PRESETS, airbench.train_airbench94,
                                   [__file__, airbench.__file__, airbench.store.__file__],
                                   argv, __doc__, check=airbench.check_airbench94)


if __name__ == '__main__':
    main()
