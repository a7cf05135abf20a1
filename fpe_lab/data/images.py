r"""Quantized image data sets: CIFAR-10 from its Python-pickle batches, and scikit-learn's 8×8 digits.

Pixels are stored as integers k ∈ {0, …, L−1} (L = ``levels``: 256 for CIFAR-10, 17 for digits) of shape
(n, C, H, W) and mapped to model space by x = 2 k / (L − 1) − 1 ∈ [−1, 1] (as Score SDE). For bits/dim,
``fpe_lab.likelihood.UniformDequantization(levels, -1, 1)`` dequantizes exactly these grid values
(x → −1 + 2(k + u)/L) and adds the bin-width term (7 bits/dim for L = 256).

No download happens at run time: CIFAR-10 must already be on disk (``cifar-10-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html, extracted). The pickles are read with an unpickler that
only accepts the numpy array reconstructors, so a tampered file cannot run code.
"""

from __future__ import annotations

import enum
import hashlib
import importlib.util
import io
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from fpe_lab.likelihood import UniformDequantization

__all__ = [
    "DataError",
    "ImageSplit",
    "ImageDataset",
    "CIFAR10_URL",
    "CIFAR10_TRAIN_FILES",
    "CIFAR10_TEST_FILES",
    "CIFAR10_META_FILE",
    "find_cifar10_dir",
    "cifar10_digest",
    "load_cifar10",
    "load_digits",
]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILES = ("test_batch",)
CIFAR10_META_FILE = "batches.meta"
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR_SHAPE = (3, 32, 32)


class DataError(ValueError):
    """Missing, corrupt or mismatched data; the message says what was expected and where it comes from."""


class ImageSplit(enum.Enum):
    TRAIN = "train"
    TEST = "test"


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """n quantized images: ``pixels`` uint8 (n, C, H, W) with values in [0, levels), ``labels`` int64 (n,)."""

    name: str
    pixels: torch.Tensor
    labels: torch.Tensor
    levels: int

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 4 or self.pixels.shape[0] == 0:
            raise DataError(
                f"{self.name}: pixels must be a non-empty uint8 tensor (n, C, H, W); "
                f"got {self.pixels.dtype} of shape {tuple(self.pixels.shape)}"
            )
        if not 2 <= self.levels <= 256:
            raise DataError(f"{self.name}: levels must be in [2, 256]; got {self.levels}")
        if int(self.pixels.max()) >= self.levels:
            raise DataError(f"{self.name}: pixel value {int(self.pixels.max())} >= levels = {self.levels}")
        if self.labels.shape != self.pixels.shape[:1]:
            raise DataError(
                f"{self.name}: {self.labels.shape[0]} labels for {self.pixels.shape[0]} images"
            )

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.pixels.shape[1:])  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """D = C·H·W."""
        return math.prod(self.image_shape)

    def scale(self, pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Training map x = 2k/(L−1) − 1 ∈ [−1, 1], same shape as ``pixels``."""
        return pixels.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def truth(self, sde: object) -> None:
        """Real images: no exact truth (bits/dim of held-out images instead)."""
        return None

    def dequantization(self) -> UniformDequantization:
        """Uniform dequantization of the ``levels`` pixel values on [−1, 1], for bits/dim."""
        from fpe_lab.likelihood import UniformDequantization

        return UniformDequantization(self.levels, -1.0, 1.0)

    def sample(
        self, n: int, generator: torch.Generator | None = None, hflip: bool = False, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """n training images drawn with replacement, scaled to [−1, 1]; shape (n, C, H, W).

        ``hflip`` mirrors each image left-right with probability ½ (the usual CIFAR-10 augmentation).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1; got {n!r}")
        idx = torch.randint(len(self), (n,), generator=generator)
        x = self.scale(self.pixels[idx], dtype)
        if hflip:
            flip = torch.rand(n, generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays only (no other callables)."""

    # numpy 2 moved numpy.core to numpy._core; pickles name either, and either maps to the installed one
    _MULTIARRAY = "numpy._core.multiarray" if importlib.util.find_spec("numpy._core") else "numpy.core.multiarray"
    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): (_MULTIARRAY, "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): (_MULTIARRAY, "_reconstruct"),
        ("numpy.core.multiarray", "scalar"): (_MULTIARRAY, "scalar"),
        ("numpy._core.multiarray", "scalar"): (_MULTIARRAY, "scalar"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        # Python 3 writes bytes at protocol 2 as _codecs.encode(str, "latin1"): a pure function
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        target = self._ALLOWED.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        mod = __import__(target[0], fromlist=[target[1]])
        return getattr(mod, target[1])


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise DataError(
            f"corrupt CIFAR-10 file {path} ({type(e).__name__}: {e}); re-extract it from {CIFAR10_URL}"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"corrupt CIFAR-10 file {path}: expected a dict, got {type(obj).__name__}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _expected_files_message(where: Path) -> str:
    files = ", ".join(CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES + (CIFAR10_META_FILE,))
    return (
        f"CIFAR-10 not found in {where}: expected the folder '{CIFAR10_FOLDER}' (or its parent) holding {files} "
        f"-- the 'CIFAR-10 python version' (cifar-10-python.tar.gz) from {CIFAR10_URL}, extracted; "
        "nothing is downloaded at run time"
    )


def find_cifar10_dir(data_dir: str | Path) -> Path:
    """The folder holding the CIFAR-10 batches: ``data_dir`` itself or ``data_dir/cifar-10-batches-py``.

    Raises DataError naming the expected files (and which are missing) when neither has them.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"--data-dir {str(data_dir)!r} is not a directory. " + _expected_files_message(root))
    needed = CIFAR10_TRAIN_FILES + CIFAR10_TEST_FILES + (CIFAR10_META_FILE,)
    best: tuple[int, Path] | None = None
    for cand in (root, root / CIFAR10_FOLDER):
        present = [f for f in needed if (cand / f).is_file()]
        if len(present) == len(needed):
            return cand
        if present and (best is None or len(present) > best[0]):
            best = (len(present), cand)
    if best is not None:
        missing = [f for f in needed if not (best[1] / f).is_file()]
        raise DataError(f"CIFAR-10 in {best[1]} is incomplete: missing {', '.join(missing)}. "
                        + _expected_files_message(root))
    raise DataError(_expected_files_message(root))


CIFAR10_DIGEST_CHARS = 16
"""Hex characters of :func:`cifar10_digest` (64 bits of sha256)."""
_DIGEST_CHUNK = 1 << 20
_DIGEST_SETTLED_NS = 2 * 10**9
"""Files modified less than this long ago are not cached: a write within the same timestamp tick (a few ms)
would leave size and mtime_ns as they were."""
_digests: dict[tuple, str] = {}  # (resolved folder, (name, size, mtime_ns) per train file) -> digest


def cifar10_digest(data_dir: str | Path) -> str:
    """A short hex sha256 of the *content* of the CIFAR-10 training batches (``CIFAR10_TRAIN_FILES``).

    ``data_dir`` is the ``cifar-10-batches-py`` folder or its parent (:func:`find_cifar10_dir`); the same
    files reached by any path (relative or absolute, a symlink, a copy elsewhere) give the same digest. Each
    file enters in the fixed order of ``CIFAR10_TRAIN_FILES`` as its name, its size and its bytes (read in
    chunks). Cached per process by the resolved folder and each file's size and mtime_ns, so repeated calls
    (every fingerprint of a cifar10 configuration) only stat the files (files changed in the last 2 s are
    read again). DataError when the data is missing, incomplete or unreadable.
    """
    folder = find_cifar10_dir(data_dir).resolve()
    paths = [folder / name for name in CIFAR10_TRAIN_FILES]
    try:
        stats = [p.stat() for p in paths]
        key = (str(folder), tuple((p.name, st.st_size, st.st_mtime_ns) for p, st in zip(paths, stats)))
        if key in _digests:
            return _digests[key]
        h = hashlib.sha256()
        for path, st in zip(paths, stats):
            h.update(f"{path.name}\0{st.st_size}\0".encode())
            n = 0
            with open(path, "rb") as fh:
                while chunk := fh.read(_DIGEST_CHUNK):
                    h.update(chunk)
                    n += len(chunk)
            if n != st.st_size:
                raise DataError(f"CIFAR-10 file {path} changed while it was read ({st.st_size} bytes, then {n})")
    except OSError as e:
        raise DataError(f"cannot read CIFAR-10 file {e.filename}: {e.strerror}") from e
    digest = h.hexdigest()[:CIFAR10_DIGEST_CHARS]
    if time.time_ns() - max(st.st_mtime_ns for st in stats) > _DIGEST_SETTLED_NS:
        _digests[key] = digest
    return digest


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _read_pickle(path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"corrupt CIFAR-10 batch {path}: keys {sorted(map(str, d))}, expected 'data' and 'labels'")
    data, labels = d["data"], np.asarray(d["labels"])
    n_pix = math.prod(_CIFAR_SHAPE)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != n_pix:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"corrupt CIFAR-10 batch {path}: 'data' must be uint8 of shape (n, {n_pix}); got {desc}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"corrupt CIFAR-10 batch {path}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"corrupt CIFAR-10 batch {path}: labels must be in 0..9; got {labels.min()}..{labels.max()}")
    return data.reshape(-1, *_CIFAR_SHAPE), labels.astype(np.int64)


def load_cifar10(data_dir: str | Path, split: ImageSplit = ImageSplit.TRAIN) -> ImageDataset:
    """CIFAR-10 train (50,000) or test (10,000) images, uint8 (n, 3, 32, 32), from the pickle batches.

    ``data_dir``: the ``cifar-10-batches-py`` folder or its parent. Rows of each batch's ``data`` are the
    1024 red, then green, then blue values of a 32×32 image in row-major order.
    """
    if not isinstance(split, ImageSplit):
        raise ValueError(f"split must be an ImageSplit ({[s.value for s in ImageSplit]}); got {split!r}")
    folder = find_cifar10_dir(data_dir)
    meta = _read_pickle(folder / CIFAR10_META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list) or len(names) != 10:
        raise DataError(f"corrupt CIFAR-10 file {folder / CIFAR10_META_FILE}: expected 10 'label_names'")
    files = CIFAR10_TRAIN_FILES if split is ImageSplit.TRAIN else CIFAR10_TEST_FILES
    parts = [_read_batch(folder / f) for f in files]
    pixels = torch.from_numpy(np.concatenate([p for p, _ in parts]))
    labels = torch.from_numpy(np.concatenate([lab for _, lab in parts]))
    return ImageDataset(name=f"cifar10-{split.value}", pixels=pixels, labels=labels, levels=256)


DIGITS_N_TEST = 297  # the last 297 of 1,797 images form the test split (1,500 train)


def load_digits(split: ImageSplit = ImageSplit.TRAIN) -> ImageDataset:
    """scikit-learn's 8×8 handwritten digits, uint8 (n, 1, 8, 8) with 17 levels (values 0..16).

    Ships with scikit-learn (no download). Train: the first 1,500 images; test: the last 297.
    """
    if not isinstance(split, ImageSplit):
        raise ValueError(f"split must be an ImageSplit ({[s.value for s in ImageSplit]}); got {split!r}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise DataError(
            "the 8x8 digits data set needs scikit-learn, which is not installed: `pip install scikit-learn` "
            "(it ships the 1,797 images offline)"
        ) from e
    bunch = sk_load_digits()
    images = np.asarray(bunch.images)
    pixels = torch.from_numpy(np.rint(images).astype(np.uint8))[:, None]
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    cut = pixels.shape[0] - DIGITS_N_TEST
    sl = slice(0, cut) if split is ImageSplit.TRAIN else slice(cut, None)
    return ImageDataset(name=f"digits-{split.value}", pixels=pixels[sl], labels=labels[sl], levels=17)
