"""Shared fixtures: a tiny CIFAR-10 in the official pickle layout, and a tiny trainer config."""
import os
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH_NAMES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']


def write_tiny_cifar(root, per_batch=60, test=100, seed=0):
    """Write root/cifar-10-batches-py/ with 5 x per_batch training and `test` test images.

    Each class has its own template, plus noise, so that a tiny network learns it in a few
    steps. Templates are coarse (8x8-pixel blocks) and mirror-symmetric, so that flips and small
    translations keep them recognisable. Returns (train_images (n,3,32,32) uint8, train_labels).
    """
    rng = np.random.default_rng(seed)
    coarse = rng.integers(40, 216, size=(10, 3, 4, 2))
    coarse = np.concatenate([coarse, coarse[..., ::-1]], axis=3)
    templates = coarse.repeat(8, axis=2).repeat(8, axis=3)
    folder = os.path.join(root, 'cifar-10-batches-py')
    os.makedirs(folder, exist_ok=True)
    written = []
    for name in BATCH_NAMES:
        n = test if name == 'test_batch' else per_batch
        labels = rng.integers(0, 10, size=n)
        images = templates[labels] + rng.normal(0, 20, size=(n, 3, 32, 32))
        images = np.clip(images, 0, 255).astype(np.uint8)
        with open(os.path.join(folder, name), 'wb') as f:
            pickle.dump({b'batch_label': name.encode(), b'labels': labels.tolist(),
                         b'data': images.reshape(n, 3072), b'filenames': [b'x.png'] * n}, f)
        written.append((images, labels))
    with open(os.path.join(folder, 'batches.meta'), 'wb') as f:
        pickle.dump({b'label_names': [b'c%d' % i for i in range(10)]}, f)
    train = written[:5]
    return np.concatenate([w[0] for w in train]), np.concatenate([w[1] for w in train])


@pytest.fixture
def tiny_data(tmp_path):
    """A tiny dataset folder (300 training and 100 test images); returns its path."""
    root = tmp_path / 'data'
    write_tiny_cifar(str(root))
    return str(root)


AIRBENCH_TINY = dict(widths='[4,8,8]', whiten_images=100)


def tiny_args(data_dir, out, runs=2, **overrides):
    """Command-line flags that make a trainer run in seconds on the tiny dataset (add the
    trainer's own, such as AIRBENCH_TINY, as overrides)."""
    settings = dict(data_dir=data_dir, out=out, runs=runs, random_indices='[0,1]',
                    easy_indices='[2,3]', epochs=2.0, batch_size=50, tta_level=0, device='cpu',
                    min_test_acc=0.0)  # tiny trainings are far from converged
    settings.update(overrides)
    args = []
    for key, value in settings.items():
        args += ['--' + key.replace('_', '-'), str(value)]
    return args
