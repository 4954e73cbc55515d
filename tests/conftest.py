"""Shared fixtures: a tiny CIFAR-10 in the official pickle layout, and tiny trainer configs."""
import json
import os
import pickle
import sys
from unittest import mock

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

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
# A small ResNet-9 that learns the tiny data in 4 epochs (24 steps; test accuracy 0.67-0.85 over
# 8 seeds, and as low as 0.15 after 2 epochs): the lr peaks after half an epoch, and faster
# BatchNorm statistics settle in those few steps (at PyTorch's 0.1 the running statistics would
# still be far from the data's, and the test accuracy near chance).
MADRY_TINY = dict(widths='[8,16,16,16]', lr=0.2, lr_peak_epoch=0.5, bn_momentum=0.5, epochs=4.0)


def read_meta(folder):
    with open(os.path.join(folder, 'meta.json')) as f:
        return json.load(f)


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


def make_experiment(out, margins_full, margins_ablated, random_indices=None, easy_indices=None,
                    test_acc=None, diverged=None, preset='synthetic', seed=0):
    """Write a synthetic experiment folder with the store API, with planted margins.

    margins_full, margins_ablated: (runs, k) arrays; the k columns are the random examples, then
    the easy ones (k // 2 random by default). Each stored logit row puts float16(margin) on the
    example's label, 0 on one other class and -60000 on the other eight, so the logsumexp of
    the nine others is exactly 0 and the margin viz.py computes is exactly float16(margin) (nan
    plants a non-finite run). The other training images get random logits, so reading a wrong
    column shows. test_acc: {arm: (runs,)}; diverged: {arm: [row, ...]} rows written with status
    'diverged'. Returns dict(margins={arm: float64 array as stored}, indices, labels, test_acc,
    config).
    """
    import store
    rng = np.random.default_rng(seed)
    given = {'full': np.asarray(margins_full, np.float64),
             'ablated': np.asarray(margins_ablated, np.float64)}
    k = given['full'].shape[1]
    if random_indices is None:
        random_indices = [3 * i for i in range(k // 2)]
    if easy_indices is None:
        easy_indices = [100 + 7 * i for i in range(k - len(random_indices))]
    indices = list(random_indices) + list(easy_indices)
    assert len(indices) == k
    labels = rng.integers(0, 10, size=k)
    n_train = max(indices) + 5
    runs = max(len(m) for m in given.values())
    config = dict(runs=runs, random_indices=list(random_indices), easy_indices=list(easy_indices),
                  preset=preset)
    stored, accs = {}, {}
    with mock.patch.object(store.os, 'fsync', lambda fd: None):  # test data needs no durability
        part, _ = store.open_for_writing(out, config, n_train, runs,
                                         labels=dict(zip(indices, labels.tolist())))
        for arm, m in given.items():
            _write_arm(part, arm, m, indices, labels, n_train, rng, test_acc, diverged,
                       stored, accs)
    return dict(margins=stored, indices=indices, labels=labels, test_acc=accs, config=config)


def _write_arm(part, arm, m, indices, labels, n_train, rng, test_acc, diverged, stored, accs):
    acc = rng.uniform(0.9, 0.95, len(m)) if test_acc is None else np.asarray(test_acc[arm])
    accs[arm] = acc
    bad = set((diverged or {}).get(arm, []))
    background = rng.normal(0, 3, size=(n_train, 10))
    for slot in range(len(m)):
        logits = background.copy()
        logits[indices] = -60000.0
        logits[indices, (labels + 1) % 10] = 0.0
        logits[indices, labels] = m[slot]
        part.write_row(arm, slot, logits, dict(seed=slot, test_acc=float(acc[slot]), seconds=1.0,
                                               status='diverged' if slot in bad else 'ok'))
    stored[arm] = m.astype(np.float16).astype(np.float64)
