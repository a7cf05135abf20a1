"""CIFAR-10 pickle loader and the digits extra (fpe_lab/data/images.py) on a tiny fake data set."""

from __future__ import annotations

import os
import pickle
import shutil
import time

import numpy as np
import pytest
import torch

from fpe_lab.data import images
from fpe_lab.data.images import (
    DataError,
    ImageDataset,
    ImageSplit,
    cifar10_digest,
    find_cifar10_dir,
    load_cifar10,
    load_digits,
)

from ..fake_cifar import write_fake_cifar10


@pytest.fixture
def cifar(tmp_path):
    return write_fake_cifar10(tmp_path, n_per_batch=6)


def test_layout_and_scaling(cifar):
    train = load_cifar10(cifar.parent)  # the parent folder works too
    test = load_cifar10(cifar, ImageSplit.TEST)
    assert train.pixels.shape == (30, 3, 32, 32) and test.pixels.shape == (6, 3, 32, 32)
    assert train.pixels.dtype == torch.uint8 and train.levels == 256 and train.dim == 3072
    # rows are R(1024), G(1024), B(1024) in row-major order: check one pixel against the raw pickle
    with open(cifar / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    img = 6 + 1  # second image of the second batch
    for c in range(3):
        assert int(train.pixels[img, c, 3, 5]) == int(raw[b"data"][1, c * 1024 + 3 * 32 + 5])
    assert train.labels[img] == raw[b"labels"][1]
    x = train.scale(torch.tensor([0, 255], dtype=torch.uint8), torch.float64)
    assert x.tolist() == [-1.0, 1.0]
    batch = train.sample(5, torch.Generator().manual_seed(0), hflip=True)
    assert batch.shape == (5, 3, 32, 32) and batch.min() >= -1 and batch.max() <= 1


def test_grid_matches_likelihood_dequantization(cifar):
    """The training map k → x lies on the grid fpe_lab.likelihood.UniformDequantization dequantizes."""
    from fpe_lab.likelihood import UniformDequantization

    data = load_cifar10(cifar, ImageSplit.TEST)
    x = data.scale(data.pixels, torch.float64)
    deq = UniformDequantization(data.levels, -1.0, 1.0)
    assert torch.equal(deq.levels_of(x), data.pixels.double())
    assert deq.offset_bits_per_dim == pytest.approx(7.0, abs=1e-12)  # float64 round-off
    with pytest.raises(ValueError, match="levels"):  # a wrong level count is caught
        UniformDequantization(17, -1.0, 1.0).levels_of(x)


def test_missing_files_named(tmp_path, cifar):
    with pytest.raises(DataError, match=r"data_batch_1.*test_batch.*batches.meta.*cs.toronto.edu/~kriz/cifar.html"):
        find_cifar10_dir(tmp_path / "empty_dir_that_does_not_exist")
    os.remove(cifar / "data_batch_3")
    with pytest.raises(DataError, match="incomplete: missing data_batch_3"):
        load_cifar10(tmp_path)



def test_digest_is_of_the_content_not_the_path(tmp_path, cifar, monkeypatch):
    digest = cifar10_digest(cifar)
    assert len(digest) == 16 and int(digest, 16) >= 0
    copy = shutil.copytree(cifar, tmp_path / "elsewhere" / "moved")  # a copy, without the usual folder name
    (tmp_path / "link").symlink_to(cifar.parent, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for spelling in (cifar.parent, "cifar-10-batches-py", ".", "./cifar-10-batches-py/", "link", copy,
                     os.path.relpath(copy)):
        assert cifar10_digest(spelling) == digest, spelling
    # every training batch counts, byte for byte (the test batch and the meta file do not train)
    data = bytearray((copy / "data_batch_5").read_bytes())
    data[-20] ^= 1
    (copy / "data_batch_5").write_bytes(bytes(data))
    assert cifar10_digest(copy) != digest
    (copy / "data_batch_5").write_bytes((cifar / "data_batch_5").read_bytes())
    (copy / "test_batch").write_bytes(b"other test images")
    assert cifar10_digest(copy) == digest
    os.remove(copy / "data_batch_2")
    with pytest.raises(DataError, match="incomplete: missing data_batch_2"):
        cifar10_digest(copy)
    with pytest.raises(DataError, match="is not a directory"):
        cifar10_digest(tmp_path / "nothing")


def test_digest_is_cached_until_a_file_changes(cifar, monkeypatch):
    settled = time.time_ns() - 10**10  # files written just now are read every time (a write may keep mtime_ns)
    for name in images.CIFAR10_TRAIN_FILES:
        os.utime(cifar / name, ns=(settled, settled))
    opened = []

    def counting_open(path, *args, **kwargs):
        opened.append(os.path.basename(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(images, "open", counting_open, raising=False)
    digest = cifar10_digest(cifar)
    assert opened == list(images.CIFAR10_TRAIN_FILES)
    assert cifar10_digest(cifar.parent) == digest and len(opened) == 5  # the same folder: not read again
    os.utime(cifar / "data_batch_3", ns=(settled + 1, settled + 1))  # a file that changed is read again
    assert cifar10_digest(cifar) == digest and len(opened) == 10


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda p: p.write_bytes(b"not a pickle"), "corrupt CIFAR-10 file"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
                                              protocol=2)),
         r"'data' must be uint8 of shape \(n, 3072\)"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2)),
         r"\(1,\) labels for 2 images"),
        (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 12]},
                                              protocol=2)),
         "labels must be in 0..9"),
        (lambda p: p.write_bytes(pickle.dumps({b"labels": [0]}, protocol=2)), "expected 'data' and 'labels'"),
        (lambda p: p.write_bytes(pickle.dumps(os.system, protocol=2)), "refusing to load"),
    ],
    ids=["garbage", "dtype", "n_labels", "label_range", "keys", "code"],
)
def test_corrupt_batch(cifar, corrupt, match):
    corrupt(cifar / "data_batch_4")
    with pytest.raises(DataError, match=match):
        load_cifar10(cifar)


def test_dataset_validation():
    with pytest.raises(DataError, match="pixel value 17 >= levels = 17"):
        ImageDataset("d", torch.full((1, 1, 2, 2), 17, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64), 17)
    with pytest.raises(DataError, match="uint8"):
        ImageDataset("d", torch.zeros(1, 1, 2, 2), torch.zeros(1, dtype=torch.int64), 17)


def test_digits():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="pip install scikit-learn"):
            load_digits()
        return
    train, test = load_digits(), load_digits(ImageSplit.TEST)
    assert train.pixels.shape == (1500, 1, 8, 8) and test.pixels.shape == (297, 1, 8, 8)
    assert train.levels == 17 and int(train.pixels.max()) == 16
