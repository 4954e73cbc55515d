"""airbench.py: the shared library of the negative-self-influence experiment.

Everything the trainers have in common lives here, once: CIFAR-10 loading, the on-device loader
with equal step counts in both arms, Keller Jordan's airbench94 network and recipe, evaluation,
and the experiment driver that trains the two arms into a resumable store. Importing it does
nothing; trainer_airbench.py and trainer_madry.py call `run_experiment`.

Models are built K-wide: one network holds K independent models as K groups of channels
(grouped convolutions, per-group BatchNorm), each with its own seed, data order, augmentation
and BatchNorm statistics. K = 1 is the ordinary single model; K > 1 trains several at once.
"""

#############################################
#                  Setup                    #
#############################################

import argparse
import ast
import hashlib
import math
import os
import pickle
import platform
import signal
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import store

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # per-channel pixel statistics of the training set
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def log(*args):
    """Messages go to stderr, so that stdout stays clean and tqdm bars are not broken."""
    tqdm.write(' '.join(str(a) for a in args), file=sys.stderr)


def pick_device(name=''):
    """'' picks CUDA when there is a GPU, else the CPU; anything else is checked and used."""
    if not name:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f'error: --device {name!r} is not a device name (try cpu or cuda:0)')
    if device.type not in ('cpu', 'cuda'):
        raise SystemExit(f'error: --device {name}: only cpu and cuda are supported')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise SystemExit(f'error: --device {name} was requested but CUDA is not available '
                             f'on this machine (torch {torch.__version__}); use --device cpu')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f'error: --device {name} does not exist: this machine has '
                             f'{torch.cuda.device_count()} CUDA device(s)')
    return device


def _parser_for(default):
    """A command-line parser that gives a value of the same type as the default."""
    def parse(text):
        if isinstance(default, str):
            return text
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise argparse.ArgumentTypeError(f'{text!r} is not a {type(default).__name__}')
        if isinstance(default, bool) and not isinstance(value, bool):
            raise argparse.ArgumentTypeError(f'{text!r} is not True or False')
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise argparse.ArgumentTypeError(f'{text!r} is not a {type(default).__name__}')
        return value
    return parse


def parse_config(defaults, presets, argv=None, description=None):
    """The experiment's config: the script's constants, then a preset, then command-line flags.

    Every constant can be set from the command line (--runs 4, --epochs 2.5, --widths [8,16,16]);
    unknown flags and preset keys are refused, so a typo cannot silently do nothing.
    """
    for name, preset in presets.items():
        unknown = set(preset) - set(defaults)
        assert not unknown, f'preset {name!r} sets unknown keys {sorted(unknown)}'
    # No abbreviations: --epoch must not quietly mean --epochs, nor stop working when a
    # constant --epoch... is added later.
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in defaults.items():
        choices = ['default', *presets] if key == 'preset' else None
        parser.add_argument('--' + key.replace('_', '-'), type=_parser_for(default), default=None,
                            choices=choices, metavar=None if choices else 'VALUE',
                            help=f'default {default!r}')
    args = vars(parser.parse_args(argv))
    preset = args['preset'] or defaults['preset']
    config = dict(defaults, **presets.get(preset, {}), preset=preset)
    config.update({k: v for k, v in args.items() if v is not None})
    return config


def shard_from_env():
    """This process's share of the run slots under torchrun and/or a SLURM job array.

    Returns (shard, num_shards, local_rank). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a SLURM
    array sets SLURM_ARRAY_TASK_ID/_COUNT/_MIN. Both together give count * world shards.
    """
    names = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_ARRAY_TASK_ID', 'SLURM_ARRAY_TASK_COUNT',
             'SLURM_ARRAY_TASK_MIN')
    seen = ', '.join(f'{k}={os.environ[k]}' for k in names if k in os.environ)
    try:
        env = {k: int(os.environ[k]) for k in names if k in os.environ}
    except ValueError:
        raise SystemExit(f'error: a sharding variable is not a whole number ({seen})') from None
    rank, world, local_rank = env.get('RANK', 0), env.get('WORLD_SIZE', 1), env.get('LOCAL_RANK', 0)
    task, tasks = 0, 1
    if 'SLURM_ARRAY_TASK_ID' in env:
        task = env['SLURM_ARRAY_TASK_ID'] - env.get('SLURM_ARRAY_TASK_MIN', 0)
        tasks = env.get('SLURM_ARRAY_TASK_COUNT', 1)
    shard, num_shards = task * world + rank, tasks * world
    if not 0 <= shard < num_shards:
        raise SystemExit(f'error: the environment ({seen}) gives shard {shard} of {num_shards}: '
                         f'RANK must lie in [0, WORLD_SIZE) and SLURM_ARRAY_TASK_ID - '
                         f'SLURM_ARRAY_TASK_MIN in [0, SLURM_ARRAY_TASK_COUNT)')
    return shard, num_shards, local_rank


def provenance(device, source_hash):
    """What made these results, beyond the config: code and library versions and hardware."""
    def git(*args):
        try:
            return subprocess.run(['git', *args], capture_output=True, text=True, timeout=10,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ''
    info = dict(source=source_hash, git_commit=git('rev-parse', 'HEAD'),
                git_dirty=bool(git('status', '--porcelain', '--untracked-files=no')),
                python=platform.python_version(), torch=torch.__version__,
                numpy=np.__version__, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                device=str(device), command=' '.join(sys.argv))
    try:
        import torchvision
        info['torchvision'] = torchvision.__version__
    except ImportError:
        pass
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    else:
        info['cpu_threads'] = torch.get_num_threads()
    return info


#############################################
#                   Data                    #
#############################################

CIFAR_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
ARCHIVE_NAME = 'cifar-10-python.tar.gz'
ARCHIVE_MD5 = 'c58f30108f718f92721af3b95e74349a'
FOLDER_NAME = 'cifar-10-batches-py'
BATCH_MD5 = {  # the official files' checksums
    'data_batch_1': 'c99cafc152244af753f735de768cd75f',
    'data_batch_2': 'd4bba439e000b95fd0a9bffe97cbabec',
    'data_batch_3': '54ebc095f3ab1f0389bbae665268c751',
    'data_batch_4': '634d18415352ddfa80567beed471001a',
    'data_batch_5': '482c414d41f54cd18b22e5b47cb7c3cb',
    'test_batch': '40351d587109b95175f43aff81a1287e',
}


class DataError(Exception):
    """The dataset cannot be used; the message says what to do."""


def _md5(path):
    digest = hashlib.md5()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def _read_batch(path):
    """One pickled batch of the official layout, as (images (n,3,32,32) uint8, labels (n,))."""
    try:
        with open(path, 'rb') as f:
            batch = pickle.load(f, encoding='bytes')
        images = np.asarray(batch[b'data'], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b'labels'], dtype=np.int64)
    except FileNotFoundError:
        raise DataError(f'{path} is missing: the dataset folder is incomplete. Delete '
                        f'{os.path.dirname(path)} and extract {ARCHIVE_NAME} again') from None
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, AttributeError,
            IndexError) as e:
        raise DataError(f'{path} is truncated or corrupt ({type(e).__name__}: {e}). Delete '
                        f'{os.path.dirname(path)} and extract {ARCHIVE_NAME} again') from None
    if len(images) != len(labels) or len(labels) == 0 or labels.min() < 0 or labels.max() > 9:
        raise DataError(f'{path} does not hold CIFAR-10 images and labels')
    return images, labels


def _extract(archive, data_dir):
    """Extract the archive next to it, into a temporary folder renamed only when complete."""
    if _md5(archive) != ARCHIVE_MD5:
        log(f'warning: {archive} differs from the official archive (MD5 mismatch); using it anyway')
    tmp = os.path.join(data_dir, f'.extract{os.getpid()}')
    try:
        with tarfile.open(archive, 'r:gz') as tar:
            safe = dict(filter='data') if hasattr(tarfile, 'data_filter') else {}
            tar.extractall(tmp, **safe)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f'{archive} is truncated or corrupt ({e}); delete it and download it '
                        f'again from {CIFAR_URL}') from None
    os.replace(os.path.join(tmp, FOLDER_NAME), os.path.join(data_dir, FOLDER_NAME))
    os.rmdir(tmp)


def _download(data_dir):
    """Fetch the official archive with torchvision, to a .part file renamed when complete."""
    from torchvision.datasets.utils import download_url
    os.makedirs(data_dir, exist_ok=True)
    part = ARCHIVE_NAME + '.part'
    log(f'downloading CIFAR-10 into {data_dir}/ ...')
    try:
        download_url(CIFAR_URL, data_dir, filename=part)
    except Exception as e:  # no network, DNS failure, HTTP error, ...: all mean the same here
        if os.path.exists(os.path.join(data_dir, part)):
            os.remove(os.path.join(data_dir, part))
        raise DataError(
            f'CIFAR-10 is not in {data_dir}/ and could not be downloaded '
            f'({type(e).__name__}: {str(e)[:200]}). Offline? Copy {ARCHIVE_NAME} (from '
            f'{CIFAR_URL}) into {data_dir}/, or its extracted {FOLDER_NAME}/ folder, and rerun. '
            f'Or point --data-dir at a folder that has them.') from None
    os.replace(os.path.join(data_dir, part), os.path.join(data_dir, ARCHIVE_NAME))


def load_cifar10(data_dir='data', check_md5=True):
    """CIFAR-10 as uint8 CPU tensors: train and test images (n,3,32,32) and labels (n,).

    Training images are in the official order: index i is torchvision's CIFAR10(train=True)[i].
    Looks for, in turn: data_dir/cifar-10-batches-py/ (read directly, no network), then
    data_dir/cifar-10-python.tar.gz (extracted), then downloads the archive.
    """
    folder = os.path.join(data_dir, FOLDER_NAME)
    archive = os.path.join(data_dir, ARCHIVE_NAME)
    if not os.path.isdir(folder):
        if not os.path.exists(archive):
            _download(data_dir)
        _extract(archive, data_dir)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    batches = [_read_batch(os.path.join(folder, name)) for name in names]
    if check_md5:
        differ = [n for n in names if _md5(os.path.join(folder, n)) != BATCH_MD5[n]]
        if differ:
            log(f'warning: {", ".join(differ)} in {folder} differ from the official CIFAR-10 '
                f'files (MD5 mismatch); using them anyway')
    train_images = np.concatenate([b[0] for b in batches[:5]])
    train_labels = np.concatenate([b[1] for b in batches[:5]])
    return dict(train_images=torch.from_numpy(train_images),
                train_labels=torch.from_numpy(train_labels),
                test_images=torch.from_numpy(batches[5][0]),
                test_labels=torch.from_numpy(batches[5][1]))


def total_steps(epochs, full_size, batch_size):
    """Optimizer steps of one training. Counted from the *full* arm's size, for both arms, so
    removing examples never changes the number of steps (with drop_last, 50,000 and 49,960
    images at batch 1000 would give 500 and 490)."""
    return math.ceil(epochs * (full_size // batch_size))


RANDOM_BITS = 20  # augmentation draws are integers in [0, 2**20), scaled to a range by `augment`


def derived_seed(seed, purpose):
    """A 63-bit seed for one use of a run's seed. The weights are drawn from torch.manual_seed(seed)
    and the data order from a generator of its own: seeding both with the same number would make
    them read one and the same random bit stream (both are mt19937)."""
    digest = hashlib.sha256(f'{purpose}:{seed}'.encode()).digest()
    return int.from_bytes(digest[:8], 'little') >> 1


def batch_plans(train_indices, seed, batch_size, steps, num_images, alternate_flip=True):
    """The data order and augmentation of one training: a (batch_size, 6) int64 CPU tensor per
    step, with columns (image index, flip, shift y, shift x, cutout y, cutout x).

    The stream is back-to-back passes over `train_indices`, each pass in a fresh random order,
    cut into batches regardless of pass boundaries: every batch is full, and the number of steps
    is exactly `steps` whatever the number of images. alternate_flip: each image gets a random
    flip in its first pass that alternates in later passes (airbench's alternating flip); else
    a fresh random flip at every draw (the usual RandomHorizontalFlip). Flips, shifts and cutout
    corners are drawn whether or not they are used, and shifts and corners are raw random
    integers that `augment` scales to its settings, so one seed gives the same order whatever
    the augmentation. All draws are on the CPU: a seed gives the same stream on every device.
    """
    gen = torch.Generator().manual_seed(derived_seed(seed, 'data order'))
    train_indices = torch.as_tensor(train_indices, dtype=torch.int64)
    first_flip = torch.randint(0, 2, (num_images,), generator=gen)
    plans, pending, passes = [], torch.empty(0, 6, dtype=torch.int64), 0
    for _ in range(steps):
        while len(pending) < batch_size:
            order = train_indices[torch.randperm(len(train_indices), generator=gen)]
            draws = torch.randint(0, 2 ** RANDOM_BITS, (len(order), 5), generator=gen)
            flip = first_flip[order] ^ (passes % 2) if alternate_flip else draws[:, 4] & 1
            fresh = torch.cat([order[:, None], flip[:, None], draws[:, :4]], dim=1)
            pending = torch.cat([pending, fresh])
            passes += 1
        plans.append(pending[:batch_size])
        pending = pending[batch_size:]
    return plans


def normalize(images_u8):
    mean = torch.tensor(CIFAR_MEAN, device=images_u8.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD, device=images_u8.device).view(1, 3, 1, 1)
    return (images_u8.float() / 255 - mean) / std


def augment(images_u8, plan, flip=True, translate=2, cutout=0, pad_mode='reflect'):
    """Normalised, augmented images (B,3,H,W) for a plan (B,6) from `batch_plans`, on the device
    of `images_u8` (the whole dataset). pad_mode 'reflect' (airbench) or 'constant' (fills with
    the mean colour) is how translation fills the border."""
    plan = plan.to(images_u8.device)
    x = normalize(images_u8[plan[:, 0]])
    if flip:
        x = torch.where(plan[:, 1].bool().view(-1, 1, 1, 1), x.flip(3), x)
    if translate:
        B, C, H, W = x.shape
        offset = (plan[:, 2:4] * (2 * translate + 1)) >> RANDOM_BITS  # in [0, 2*translate]
        padded = F.pad(x, (translate,) * 4, mode=pad_mode)
        rows = offset[:, 0:1] + torch.arange(H, device=x.device)
        cols = offset[:, 1:2] + torch.arange(W, device=x.device)
        x = padded[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None],
                   cols[:, None, :]].permute(0, 3, 1, 2)  # (B,H,W,C) -> (B,C,H,W), channels_last
    if cutout:
        B, C, H, W = x.shape
        corner = (plan[:, 4:6] * (H - cutout + 1)) >> RANDOM_BITS  # the square lies inside
        r = torch.arange(H, device=x.device)
        inside_r = (r >= corner[:, 0:1]) & (r < corner[:, 0:1] + cutout)
        inside_c = (r >= corner[:, 1:2]) & (r < corner[:, 1:2] + cutout)
        x = x * ~(inside_r[:, None, :, None] & inside_c[:, None, None, :])
    return x


def stack_batches(images_u8, labels, plans, **aug):
    """Inputs (B, K*3, H, W) and labels (B, K) for K models, each with its own plan (B,6)."""
    K = len(plans)
    x = augment(images_u8, torch.cat(plans), **aug)
    B = len(plans[0])
    x = x.view(K, B, *x.shape[1:]).transpose(0, 1).reshape(B, K * x.shape[1], *x.shape[2:])
    y = labels[torch.cat(plans)[:, 0].to(labels.device)].view(K, B).t()
    return x.contiguous(memory_format=torch.channels_last), y


#############################################
#                 Network                   #
#############################################

def conv(c_in, c_out, kernel, models, padding='same', bias=False, stride=1):
    """A convolution of K = `models` independent models: K groups of c_in -> c_out channels."""
    return nn.Conv2d(c_in * models, c_out * models, kernel, stride=stride, padding=padding,
                     bias=bias, groups=models)


class Head(nn.Module):
    """(B, K*10, 1, 1) -> (B, K, 10) logits, times a fixed scale."""

    def __init__(self, models, scale):
        super().__init__()
        self.models, self.scale = models, scale

    def forward(self, x):
        return x.view(len(x), self.models, -1) * self.scale


def airbench94(models=1, widths=(64, 256, 256), bn_momentum=0.4, bn_eps=1e-12):
    """Keller Jordan's airbench94 network, K = `models` copies side by side.

    A 2x2 patch-whitening convolution (24 channels, whose weights `train_airbench94` sets from
    `whitening_weights`; its bias starts at zero), three groups of
    conv-pool-BN-GELU-conv-BN-GELU, a 3x3 max-pool and a linear head scaled by 1/9. BatchNorm
    weights are frozen at 1 (only biases learn); its momentum is PyTorch's (airbench's 0.6).
    """
    def batchnorm(c):
        bn = nn.BatchNorm2d(c * models, momentum=bn_momentum, eps=bn_eps)
        bn.weight.requires_grad_(False)
        return bn

    layers = [conv(3, 24, 2, models, padding=0, bias=True), nn.GELU()]
    for c_in, c_out in zip([24, *widths[:-1]], widths):
        layers += [conv(c_in, c_out, 3, models), nn.MaxPool2d(2), batchnorm(c_out), nn.GELU(),
                   conv(c_out, c_out, 3, models), batchnorm(c_out), nn.GELU()]
    layers += [nn.MaxPool2d(3), conv(widths[-1], 10, 1, models, padding=0), Head(models, 1 / 9)]
    net = nn.Sequential(*layers)
    nn.init.zeros_(net[0].bias)
    for layer in net[2:]:
        if isinstance(layer, nn.Conv2d) and layer.kernel_size == (3, 3):
            # Identity init of the first c_in filters of each model: the net starts near a
            # shallower one, which trains faster (airbench's "dirac" trick).
            weight = layer.weight.data.view(models, -1, *layer.weight.shape[1:])
            for w in weight:
                nn.init.dirac_(w[:w.shape[1]])
    return net


def whitening_weights(images_u8, eps=5e-4):
    """Weights (24,3,2,2) that whiten 2x2 patches of these images: the eigenvectors of the patch
    second-moment matrix scaled by 1/sqrt(eigenvalue + eps), with and without sign.
    Computed in float64 on the CPU so that every device starts from identical weights."""
    moment = torch.zeros(12, 12, dtype=torch.float64)
    count = 0
    for chunk in images_u8.cpu().split(500):
        x = normalize(chunk).double()
        patches = x.unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
        moment += patches.t() @ patches
        count += len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment / count)
    w = (eigenvectors.t() / torch.sqrt(eigenvalues + eps)[:, None]).view(12, 3, 2, 2)
    return torch.cat([w, -w]).float()


def build_models(make_net, seeds, prepare=None):
    """A K-wide network whose model k is exactly what `make_net(models=1)` builds after
    torch.manual_seed(seeds[k]) (then `prepare(net)`): so K-at-once training starts from the
    same weights as K one-at-a-time trainings."""
    singles = []
    for seed in seeds:
        torch.manual_seed(seed)
        net = make_net(models=1)
        if prepare is not None:
            prepare(net)
        singles.append(net)
    if len(singles) == 1:
        return singles[0]
    wide = make_net(models=len(seeds))
    states = [s.state_dict() for s in singles]
    wide.load_state_dict({k: torch.cat([s[k] for s in states]) if v.ndim else v
                          for k, v in wide.state_dict().items()})
    for name, param in wide.named_parameters():  # frozen in the singles: frozen here too
        param.requires_grad_(singles[0].get_parameter(name).requires_grad)
    return wide


#############################################
#                 Training                  #
#############################################

def autocast(device):
    """bfloat16 autocast on CUDA (fast, no loss scaling needed); plain float32 on the CPU."""
    if device.type == 'cuda':
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return torch.autocast('cpu', enabled=False)


_EAGER_ONLY = []  # holds the error once torch.compile has failed: from then on all nets run eagerly


def maybe_compile(net, config, device):
    """The net's forward function, compiled when config['compile'] asks for it ('auto' means on
    CUDA only: on 2 CPU cores compiling took 30-60 s per process and then trained 1.2-1.4x
    faster (bench.py), which pays for long experiments only; the cpu presets turn it on).

    If compilation fails (no compiler, unsupported platform), this prints one note and runs the
    net eagerly from then on: the same computation, only slower.
    """
    wanted = config['compile'] == 'on' or (config['compile'] == 'auto' and device.type == 'cuda')
    if not wanted or _EAGER_ONLY:
        return net
    try:
        compiled = torch.compile(net)  # some platforms refuse here (e.g. an unsupported Python)
    except Exception as e:
        _fall_back_to_eager(e)
        return net

    def forward(x):
        if not _EAGER_ONLY:
            try:
                return compiled(x)
            except Exception as e:  # most compilation errors surface at the first call
                _fall_back_to_eager(e)
        return net(x)
    return forward


def _fall_back_to_eager(error):
    _EAGER_ONLY.append(error)
    log(f'note: torch.compile failed ({type(error).__name__}: {str(error)[:200]}); running '
        f'eagerly from now on (same results, slower)')


def lr_multiplier_airbench(step, steps):
    """airbench94's schedule: 0.2x at step 0, up to 1x at 23% of the steps, down to 0.07x."""
    return float(np.interp(step, [0, int(0.23 * steps), steps], [0.2, 1.0, 0.07]))


class Lookahead:
    """airbench's lookahead/EMA: every few steps the weights are pulled into a slow average,
    and the net continues from that average. Covers parameters and BatchNorm statistics."""

    def __init__(self, net):
        self.live = [v for v in net.state_dict().values() if v.dtype.is_floating_point]
        self.slow = [v.clone() for v in self.live]

    @torch.no_grad()
    def update(self, decay):
        torch._foreach_lerp_(self.slow, self.live, 1 - decay)
        torch._foreach_copy_(self.live, self.slow)


def check_airbench94(config, data):
    """Settings the airbench94 recipe cannot train with (run_experiment checks them before it
    writes anything)."""
    if total_steps(config['epochs'], data['full_size'], config['batch_size']) < config['ema_every']:
        raise SystemExit(f'error: fewer training steps than ema_every ({config["ema_every"]}): '
                         f'the lookahead average would never take a step; train longer')
    if len(config['widths']) != 3:
        raise SystemExit(f'error: widths must be three channel counts (the conv groups), got '
                         f'{config["widths"]}')
    if not 0 <= config['cutout'] <= 32:
        raise SystemExit(f'error: cutout must lie in [0, 32] pixels, got {config["cutout"]}')
    if not 1 <= config['whiten_images'] <= len(data['shared_indices']):
        raise SystemExit(f'error: whiten_images must lie in [1, {len(data["shared_indices"])}], '
                         f'got {config["whiten_images"]}')


def train_airbench94(data, seeds, train_indices, config, device, on_step=None):
    """Train len(seeds) airbench94 models at once; model k uses seeds[k] and train_indices[k].

    data: dict from `prepare_data` (dataset on the device, plus 'full_size' and
    'shared_indices'). Returns the K-wide network with its final (lookahead-averaged) weights.
    """
    check_airbench94(config, data)
    batch_size = config['batch_size']
    whiten_bias_steps = math.ceil(config['whiten_bias_epochs'] * (data['full_size'] // batch_size))

    # Data-dependent init from images that are in both arms and never among the excluded
    # examples, so that the ablated arm does not see them even through its initialisation.
    key = f"whitening from {config['whiten_images']} images"  # computed once per dataset
    if key not in data:
        data[key] = whitening_weights(
            data['train_images'][data['shared_indices'][:config['whiten_images']]])

    def prepare(net):
        net[0].weight.data.copy_(data[key])
        net[0].weight.requires_grad_(False)  # the whitening filters stay fixed; the bias trains

    make = lambda models: airbench94(models, config['widths'], config['bn_momentum'])
    net = build_models(make, seeds, prepare).to(device, memory_format=torch.channels_last)

    # airbench's units: the loss is summed over the batch and lr is per 1024 examples, divided by
    # the factor by which Nesterov momentum amplifies a steady gradient.
    momentum = config['momentum']
    kilostep = 1024 * (1 + 1 / (1 - momentum))
    lr = config['lr'] / kilostep
    wd = config['weight_decay'] * batch_size / kilostep
    lr_bias = lr * config['bias_lr_scale']
    bn_biases = [m.bias for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    whiten_bias = [net[0].bias]
    others = [p for p in net.parameters() if p.requires_grad
              and all(p is not q for q in bn_biases + whiten_bias)]
    groups = [dict(params=bn_biases, base_lr=lr_bias, weight_decay=wd / lr_bias),
              dict(params=others, base_lr=lr, weight_decay=wd / lr),
              # The whitening bias trains for the first epochs only: a zero lr afterwards freezes
              # it without changing the set of trained tensors (no recompilation).
              dict(params=whiten_bias, base_lr=lr, weight_decay=wd / lr, until=whiten_bias_steps)]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True)
    lookahead = Lookahead(net)
    every = config['ema_every']

    def after_step(step, steps):
        if step % every == 0:
            lookahead.update(config['ema_rate'] ** every * (step / steps) ** 3)

    run_training(net, optimizer, data, seeds, train_indices, config, device,
                 schedule=lr_multiplier_airbench, reduction='sum', pad_mode='reflect',
                 on_step=on_step, after_step=after_step)
    lookahead.update(1.0)  # the final weights are the averaged ones
    return net


def run_training(net, optimizer, data, seeds, train_indices, config, device, *, schedule,
                 reduction, pad_mode, on_step=None, after_step=None):
    """The training loop both recipes share: K models, each on its own data stream.

    Each param group's lr is its 'base_lr' times schedule(step, steps), and zero from its
    optional 'until' step on. reduction: 'sum' or 'mean' of the cross-entropy over each model's
    batch (the models' losses are added: their gradients do not mix). after_step(step, steps)
    and on_step(step, steps) are called after each optimizer step (step counts from 1).
    """
    steps = total_steps(config['epochs'], data['full_size'], config['batch_size'])
    # The whole training's plan goes to the device in one copy: (steps, batch, 6) per model.
    plans = [torch.stack(batch_plans(idx, seed, config['batch_size'], steps,
                                     len(data['train_images']),
                                     config['alternate_flip'])).to(device)
             for seed, idx in zip(seeds, train_indices)]
    aug = dict(flip=config['flip'], translate=config['translate'], cutout=config['cutout'],
               pad_mode=pad_mode)
    scale = 1.0 if reduction == 'sum' else 1.0 / config['batch_size']
    forward = maybe_compile(net, config, device)
    net.train()
    for step in range(steps):
        x, y = stack_batches(data['train_images'], data['train_labels'],
                             [p[step] for p in plans], **aug)
        for group in optimizer.param_groups:
            on = step < group.get('until', steps)
            group['lr'] = group['base_lr'] * schedule(step, steps) * on
        with autocast(device):
            logits = forward(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1),
                               reduction='sum', label_smoothing=config['label_smoothing'])
        optimizer.zero_grad(set_to_none=True)
        (loss * scale).backward()
        optimizer.step()
        if after_step is not None:
            after_step(step + 1, steps)
        if on_step is not None:
            on_step(step + 1, steps)


#############################################
#                Evaluation                 #
#############################################

@torch.no_grad()
def predict(net, images_u8, models, device, tta_level=0, batch_size=1000, forward=None):
    """Logits (K, n, 10) float32 of a K-wide net on un-augmented images, in eval mode.

    Without autocast, on every device: bfloat16 keeps 8 significant bits, which would round
    logits of 10-20 to steps of 0.06-0.125, far coarser than the float16 they are stored in.
    (CUDA convolutions then run in TF32 by PyTorch's default, with float16's 11 significant
    bits.) Inference is a small share of a training, so the precision costs little.
    tta_level 0: the images as they are. 1: averaged with their mirror images. 2: also with
    1-pixel translations up-left and down-right (airbench's test-time augmentation).
    Batches are padded to a fixed size so that a compiled `forward` sees one shape.
    """
    net.eval()
    forward = forward or net

    def run(x):
        return forward(x.repeat(1, models, 1, 1).contiguous(memory_format=torch.channels_last))

    def mirror(x):
        return run(x) if tta_level == 0 else 0.5 * (run(x) + run(x.flip(3)))

    def translated(x):
        padded = F.pad(x, (1,) * 4, mode='reflect')
        H, W = x.shape[2:]
        return 0.5 * (mirror(padded[:, :, :H, :W]) + mirror(padded[:, :, 2:, 2:]))

    outputs = []
    for chunk in images_u8.split(batch_size):
        x = normalize(chunk.to(device))
        n = len(x)
        if n < batch_size:
            x = torch.cat([x, x.new_zeros(batch_size - n, *x.shape[1:])])
        out = mirror(x) if tta_level < 2 else 0.5 * mirror(x) + 0.5 * translated(x)
        outputs.append(out[:n])
    return torch.cat(outputs).transpose(0, 1)


def accuracy(logits, labels):
    """Per-model accuracy (K,) from logits (K, n, 10)."""
    return (logits.argmax(2) == labels.to(logits.device)).float().mean(1)


#############################################
#                   Main                    #
#############################################

def experiment_indices(config, num_train):
    """The excluded examples and the two arms' training sets, checked against the data."""
    excluded = list(config['random_indices']) + list(config['easy_indices'])
    if not excluded:
        raise SystemExit('error: no excluded examples: random_indices and easy_indices are empty')
    bad = [i for i in excluded if not isinstance(i, int) or not 0 <= i < num_train]
    if bad:
        raise SystemExit(f'error: excluded indices {bad} are out of range for {num_train} '
                         f'training images')
    if len(set(excluded)) != len(excluded):
        dup = sorted({i for i in excluded if excluded.count(i) > 1})
        raise SystemExit(f'error: excluded indices are duplicated: {dup}')
    subset = config['train_subset']
    if subset and subset < 0:
        raise SystemExit('error: train_subset must be 0 (all images) or a positive count')
    full = sorted(set(range(min(subset, num_train)) if subset else range(num_train)) | set(excluded))
    excluded_set = set(excluded)
    return excluded, dict(full=full, ablated=[i for i in full if i not in excluded_set])


def prepare_data(config, device):
    """The dataset on the device plus what the trainers need to know about the two arms."""
    try:
        data = load_cifar10(config['data_dir'])
    except DataError as e:
        raise SystemExit(f'error: {e}')
    excluded, arm_indices = experiment_indices(config, len(data['train_labels']))
    if config['batch_size'] > len(arm_indices['full']):
        raise SystemExit(f'error: batch_size {config["batch_size"]} is larger than the training '
                         f'set ({len(arm_indices["full"])} images)')
    data = {k: v.to(device) for k, v in data.items()}
    data.update(full_size=len(arm_indices['full']), arm_indices=arm_indices,
                shared_indices=torch.tensor(arm_indices['ablated']), excluded=excluded)
    return data


def train_and_evaluate(train_fn, data, seeds, train_indices, config, device, on_step=None):
    """Train len(seeds) models at once, then take their logits on the training images and
    their test accuracy: what one chunk of an experiment costs (bench.py times this too).

    Returns train_logits (K, n_train, 10) float32 numpy, test_acc (K,) and finite (K,) numpy,
    and seconds: {'train', 'infer', 'test'} wall-clock seconds for the whole chunk.
    """
    def now():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        return time.perf_counter()

    t0 = now()
    net = train_fn(data, seeds, train_indices, config, device, on_step)
    t1 = now()
    forward = maybe_compile(net, config, device)
    train_logits = predict(net, data['train_images'], len(seeds), device, forward=forward)
    finite = torch.isfinite(train_logits).flatten(1).all(1).cpu().numpy()
    train_logits = train_logits.cpu().numpy()
    t2 = now()
    test_acc = accuracy(predict(net, data['test_images'], len(seeds), device,
                                tta_level=config['tta_level'], forward=forward),
                        data['test_labels']).cpu().numpy()
    t3 = now()
    return dict(train_logits=train_logits, test_acc=test_acc, finite=finite,
                seconds=dict(train=t1 - t0, infer=t2 - t1, test=t3 - t2))


class Stop(Exception):
    """Raised between training steps after SIGTERM or Ctrl-C: the run in flight is abandoned."""


def run_experiment(name, defaults, presets, train_fn, source_files, argv=None, doc=None,
                   check=None):
    """Train config['runs'] models in each arm and store their logits; resumable.

    name: the experiment's folder under logits/ for the default preset (the preset is appended
    otherwise); a function of the config, or a string.
    train_fn(data, seeds, train_indices, config, device, on_step) -> K-wide net.
    source_files: the code that defines the experiment, saved with the results.
    check(config, data): the recipe's own checks of its settings. Every check runs before
    anything is written, so a refused setting leaves no folder behind and locks nothing.
    """
    config = parse_config(defaults, presets, argv, doc)
    for key, low in (('runs', 1), ('models_per_device', 1), ('batch_size', 1)):
        if config[key] < low:
            raise SystemExit(f'error: --{key.replace("_", "-")} must be at least {low}, '
                             f'got {config[key]}')
    if not config['epochs'] > 0:
        raise SystemExit(f'error: --epochs must be positive, got {config["epochs"]}')
    if not config['lr'] > 0:
        raise SystemExit(f'error: --lr must be positive, got {config["lr"]}')
    if not 0 <= config['momentum'] < 1:
        raise SystemExit(f'error: --momentum must lie in [0, 1), got {config["momentum"]}')
    if config['tta_level'] not in (0, 1, 2):
        raise SystemExit(f'error: --tta-level must be 0, 1 or 2, got {config["tta_level"]}')
    if not 0 <= config['min_test_acc'] <= 1:
        raise SystemExit(f'error: --min-test-acc must lie in [0, 1], got {config["min_test_acc"]}')
    if config['compile'] not in ('auto', 'on', 'off'):
        raise SystemExit(f'error: --compile must be auto, on or off, got {config["compile"]!r}')
    if not config['out']:
        suffix = '' if config['preset'] == 'default' else '_' + config['preset']
        config['out'] = os.path.join('logits', (name(config) if callable(name) else name) + suffix)
    shard, num_shards, local_rank = shard_from_env()
    device = pick_device(config['device'] or ('cuda:%d' % local_rank if num_shards > 1
                                              and torch.cuda.is_available() else ''))
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True

    data = prepare_data(config, device)
    if check is not None:
        check(config, data)
    K = config['models_per_device']
    try:
        source = store.sources_digest(source_files)
        part, todo = store.open_for_writing(
            config['out'], config, len(data['train_labels']), config['runs'], shard, num_shards,
            # Settings that change where or how fast, not what, is computed:
            ignore_keys=('runs', 'out', 'data_dir', 'device', 'models_per_device', 'compile'),
            session=provenance(device, source),
            labels={i: int(data['train_labels'][i]) for i in data['excluded']})
        store.save_sources(config['out'], source_files)
    except (store.StoreError, OSError) as e:
        raise SystemExit(f'error: {e}')
    log(f'{config["out"]}: preset {config["preset"]}, {len(todo)} runs to train on {device}'
        + (f' (shard {shard} of {num_shards})' if num_shards > 1 else ''))

    # SIGTERM (preemption) and Ctrl-C: the run in flight is abandoned at its next step, and a
    # second Ctrl-C interrupts at once.
    stop_requested = []

    def request_stop(signum, frame):
        stop_requested.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handlers = {sig: signal.signal(sig, request_stop)
                         for sig in (signal.SIGTERM, signal.SIGINT)}
    # In a terminal: a bar of runs and one of the current run's steps. In a log file (a SLURM
    # job's, say) carriage returns pile up, so there: the runs bar at most once a minute.
    interactive = sys.stderr.isatty()
    bar = tqdm(total=len(todo), unit='run', dynamic_ncols=True,
               mininterval=0.1 if interactive else 60)
    steps_bar = tqdm(unit='step', leave=False, dynamic_ncols=True, position=1,
                     disable=not interactive)

    def on_step(step, steps):
        if stop_requested:
            raise Stop
        if step == 1:  # a fresh bar per chunk of runs, so that its rate and ETA are this one's
            steps_bar.reset(total=steps)
        steps_bar.update(1)

    stopped = False
    try:
        for start in range(0, len(todo), K):
            if stop_requested:
                raise Stop
            chunk = todo[start:start + K]
            seeds = [config['seed'] + 2 * slot + store.ARMS.index(arm) for arm, slot in chunk]
            indices = [data['arm_indices'][arm] for arm, _ in chunk]
            result = train_and_evaluate(train_fn, data, seeds, indices, config, device, on_step)
            finite, test_acc = result['finite'], result['test_acc']
            seconds = sum(result['seconds'].values()) / len(chunk)
            for k, (arm, slot) in enumerate(chunk):
                acc = float(test_acc[k])
                diverged = not finite[k] or acc < config['min_test_acc']
                part.write_row(arm, slot, result['train_logits'][k], dict(
                    seed=seeds[k], test_acc=acc, seconds=round(seconds, 3),
                    status='diverged' if diverged else 'ok', models_at_once=len(chunk),
                    session=len(part.meta['sessions']) - 1,
                    finished=time.strftime('%Y-%m-%dT%H:%M:%S')))
                if diverged:
                    log(f'warning: {arm} run {slot} diverged (test accuracy {acc:.3f}, '
                        f'finite logits: {bool(finite[k])}); recorded, and skipped by viz.py')
            bar.set_postfix_str(f'{chunk[-1][0]} {chunk[-1][1]}: test acc {acc:.4f}',
                                refresh=interactive)
            bar.update(len(chunk))
    except Stop:
        stopped = True
    except OSError as e:
        raise SystemExit(f'error: writing results to {config["out"]} failed: {e}. Finished runs '
                         f'are kept; free space and rerun the same command to resume.')
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        part.close()
        steps_bar.close()  # before any message that ends the process, so it is not drawn over
        bar.close()
    if stopped:
        signum = stop_requested[0]
        log(f'stopped by {signal.Signals(signum).name}; the run in flight was abandoned. Rerun '
            f'the same command to resume.')
        raise SystemExit(128 + signum)
    diverged = sum(row.get('status') == 'diverged' for arm in store.ARMS for row in part.rows(arm))
    if diverged:
        log(f'warning: {diverged} of the runs in {part.folder} diverged (non-finite logits or '
            f'test accuracy below min_test_acc {config["min_test_acc"]}); viz.py skips them')
    log(f'done: {config["out"]} (python viz.py {config["out"]})')
    return config
