from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._paths import DataError, require_file

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                 "truck")


@dataclass(frozen=True)
class ImageDataset:
    """An image classification data set as uint8 NHWC arrays and int64 labels.

    ``train_x`` (N, H, W, C), ``train_y`` (N,), likewise ``test_x``/``test_y``; ``classes`` names
    the labels; ``source`` says which files were read. Conversion to float and normalisation
    belong to the training pipeline (:func:`to_float_nchw`).
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]
    source: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image as the models see it."""
        _, h, w, c = self.train_x.shape
        return c, h, w


def to_float_nchw(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 NHWC images as normalised float32 NCHW: ``(x / 255 - mean) / std`` per channel."""
    x = images.astype(np.float32) / np.float32(255.0)
    scaled = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(scaled.transpose(0, 3, 1, 2), dtype=np.float32)


# ------------------------------------------------------------------------------------------- IDX

_IDX_DTYPES = {0x08: np.dtype(np.uint8)}


def read_idx(path: Path, ndim: int, count: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``ndim`` 1: labels, 3: images), gzip or plain.

    Keeps the first ``count`` items. Every header field and the body length are checked; a bad
    file raises :class:`DataError` naming it and the expected layout.
    """
    expected = (f"an IDX{ndim} unsigned-byte file (MNIST/Fashion-MNIST format: magic 0x000008{ndim:02x}, "
                f"{ndim} big-endian int32 dimensions, then the bytes), gzip-compressed if named *.gz")
    require_file(path, expected)
    header_len = 4 + 4 * ndim
    try:
        opener: Any = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as fh:
            header = fh.read(header_len)
            if len(header) < header_len:
                raise DataError(f"{path}: {len(header)} bytes, shorter than the {header_len}-byte header; "
                                f"expected {expected}")
            magic, *dims = (int(v) for v in np.frombuffer(header, dtype=">i4"))
            if magic != 0x800 + ndim:
                raise DataError(f"{path}: magic number {magic:#010x}, not {0x800 + ndim:#010x}; "
                                f"expected {expected}")
            if any(d <= 0 for d in dims):
                raise DataError(f"{path}: bad dimensions {dims}; expected {expected}")
            take = dims[0] if count is None else min(dims[0], count)
            item = int(np.prod(dims[1:], dtype=np.int64))
            body = fh.read(take * item)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); expected {expected}") from exc
    if len(body) != take * item:
        raise DataError(f"{path}: truncated: {len(body)} bytes of data where {take * item} were expected "
                        f"for {take} items of shape {tuple(dims[1:])}; expected {expected}")
    return np.frombuffer(body, dtype=np.uint8).reshape(take, *dims[1:]).copy()


def fashion_mnist(root: Path, limit: int | None = None) -> ImageDataset:
    """Fashion-MNIST from ``root/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    ``limit`` keeps the first ``limit`` train and test items (quick runs and tests).
    """
    folder = root / "fashion-mnist"
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 3, limit)
        y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 1, limit)
        if len(x) != len(y):
            raise DataError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        if y.max(initial=0) >= 10:
            raise DataError(f"{folder}/{prefix}-labels-idx1-ubyte.gz: label {int(y.max())} outside 0..9")
        parts[split] = (x[..., None], y.astype(np.int64))
    return ImageDataset("fashion-mnist", *parts["train"], *parts["test"], FASHION_CLASSES, str(folder))


# ----------------------------------------------------------------------------------------- CIFAR

_CIFAR_PICKLE = ("the python pickle batches of the official CIFAR-10 release (cifar-10-batches-py/"
                 "data_batch_1..5 and test_batch: dicts with b'data' (10000, 3072) uint8 CHW rows and "
                 "b'labels')")
_CIFAR_NPZ = ("an npz with train_x (N,32,32,3) uint8, train_y (N,), test_x, test_y (the "
              "cifar10_lossless_partial.npz subset)")


class _BatchUnpickler(pickle.Unpickler):
    """Loads CIFAR batch dicts and NumPy arrays, nothing else: a pickle can run arbitrary code."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    require_file(path, _CIFAR_PICKLE)
    try:
        with open(path, "rb") as fh:
            batch = _BatchUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a format error of this file
        raise DataError(f"{path}: not a CIFAR-10 pickle batch ({type(exc).__name__}: {exc}); "
                        f"expected {_CIFAR_PICKLE}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not a dict; expected {_CIFAR_PICKLE}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: keys {sorted(map(str, batch))} lack data/labels; expected {_CIFAR_PICKLE}")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: data {data.dtype} {data.shape} with {len(labels)} labels; "
                        f"expected {_CIFAR_PICKLE}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def cifar10(root: Path, limit: int | None = None) -> ImageDataset:
    """CIFAR-10: the official pickle batches if present, else the npz subset.

    Looks for ``root/cifar-10/cifar-10-batches-py/`` (or ``root/cifar-10-batches-py/``), then
    ``root/cifar-10/cifar10_lossless_partial.npz``. ``limit`` keeps the first items of each split.
    """
    for folder in (root / "cifar-10" / "cifar-10-batches-py", root / "cifar-10-batches-py"):
        if folder.is_dir():
            train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
            tx, ty = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
            ex, ey = _read_cifar_batch(folder / "test_batch")
            return _cifar_dataset(tx, ty, ex, ey, limit, str(folder))
    path = require_file(root / "cifar-10" / "cifar10_lossless_partial.npz",
                        f"{_CIFAR_PICKLE} in {root / 'cifar-10' / 'cifar-10-batches-py'}, or {_CIFAR_NPZ}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc}); expected {_CIFAR_NPZ}") from exc
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
            raise DataError(f"{path}: {split}_x {x.dtype} {x.shape} with {len(y)} labels; "
                            f"expected {_CIFAR_NPZ}")
    return _cifar_dataset(arrays["train_x"], arrays["train_y"].astype(np.int64), arrays["test_x"],
                          arrays["test_y"].astype(np.int64), limit, str(path))


def _cifar_dataset(tx, ty, ex, ey, limit, source) -> ImageDataset:
    for name, y in (("train", ty), ("test", ey)):
        if len(y) and (y.min() < 0 or y.max() >= 10):
            raise DataError(f"{source}: {name} labels outside 0..9")
    if limit is not None:
        tx, ty, ex, ey = tx[:limit], ty[:limit], ex[:limit], ey[:limit]
    return ImageDataset("cifar10", tx, ty, ex, ey, CIFAR_CLASSES, source)
