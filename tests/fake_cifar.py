"""A tiny fake CIFAR-10 in the exact on-disk format: pickled dicts with bytes keys, as in cifar-10-python.tar.gz."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

LABEL_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]


def write_fake_cifar10(parent: Path, n_per_batch: int = 8, seed: int = 0) -> Path:
    """Write ``parent/cifar-10-batches-py`` with data_batch_1..5, test_batch, batches.meta; return the folder.

    Each image is smooth (a colour gradient plus noise) so a few training steps see structured data.
    """
    rng = np.random.default_rng(seed)
    folder = Path(parent) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0

    def batch(label: bytes, n: int) -> dict:
        base = np.stack([xx, yy, 1 - xx], 0)[None] * rng.uniform(50, 200, size=(n, 3, 1, 1))
        imgs = np.clip(base + rng.normal(0, 10, size=(n, 3, 32, 32)), 0, 255).astype(np.uint8)
        return {
            b"batch_label": label,
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": imgs.reshape(n, 3072),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        }

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(f"training batch {i} of 5".encode(), n_per_batch), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(b"testing batch 1 of 1", n_per_batch), protocol=2))
    meta = {b"num_cases_per_batch": n_per_batch, b"label_names": LABEL_NAMES, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder
