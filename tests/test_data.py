"""Loading CIFAR-10: the official folder, the archive, checksums, damage and no network."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch

import airbench
from conftest import write_tiny_cifar


def test_reads_official_folder_in_order(tmp_path, capsys):
    images, labels = write_tiny_cifar(str(tmp_path))
    data = airbench.load_cifar10(str(tmp_path))
    assert data['train_images'].dtype == torch.uint8
    assert data['train_images'].shape == (300, 3, 32, 32)
    assert np.array_equal(data['train_images'].numpy(), images)
    assert np.array_equal(data['train_labels'].numpy(), labels)
    assert data['test_images'].shape == (100, 3, 32, 32)
    # Not the official files: the MD5 check warns and names them, but does not refuse.
    assert 'data_batch_1' in capsys.readouterr().err


def test_reads_archive_and_extracts_it(tmp_path, monkeypatch):
    source = tmp_path / 'src'
    images, _ = write_tiny_cifar(str(source))
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    with tarfile.open(data_dir / airbench.ARCHIVE_NAME, 'w:gz') as tar:
        tar.add(source / airbench.FOLDER_NAME, arcname=airbench.FOLDER_NAME)
    monkeypatch.setattr(airbench, 'CIFAR_URL', 'http://127.0.0.1:9/unreachable')  # never used
    data = airbench.load_cifar10(str(data_dir))
    assert np.array_equal(data['train_images'].numpy(), images)
    assert (data_dir / airbench.FOLDER_NAME / 'test_batch').exists()


def test_truncated_archive_is_refused_and_not_half_used(tmp_path):
    source = tmp_path / 'src'
    write_tiny_cifar(str(source))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tar:
        tar.add(source / airbench.FOLDER_NAME, arcname=airbench.FOLDER_NAME)
    data_dir = tmp_path / 'data'
    data_dir.mkdir()
    (data_dir / airbench.ARCHIVE_NAME).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(airbench.DataError, match='truncated or corrupt'):
        airbench.load_cifar10(str(data_dir))
    assert not (data_dir / airbench.FOLDER_NAME).exists()  # nothing half-extracted is left


def test_corrupt_batch_names_the_file(tiny_data):
    path = os.path.join(tiny_data, airbench.FOLDER_NAME, 'data_batch_3')
    with open(path, 'r+b') as f:
        f.truncate(1000)
    with pytest.raises(airbench.DataError, match='data_batch_3 is truncated or corrupt'):
        airbench.load_cifar10(tiny_data)


def test_missing_batch_names_the_file(tiny_data):
    os.remove(os.path.join(tiny_data, airbench.FOLDER_NAME, 'data_batch_4'))
    with pytest.raises(airbench.DataError, match='data_batch_4 is missing'):
        airbench.load_cifar10(tiny_data)


def test_offline_without_data_gives_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(airbench, 'CIFAR_URL', 'http://127.0.0.1:9/cifar-10-python.tar.gz')
    data_dir = tmp_path / 'empty'
    with pytest.raises(airbench.DataError) as info:
        airbench.load_cifar10(str(data_dir))
    message = str(info.value)
    assert 'could not be downloaded' in message and str(data_dir) in message
    assert airbench.ARCHIVE_NAME in message and airbench.FOLDER_NAME in message
    assert not any(name.endswith('.part') for name in os.listdir(data_dir))
