from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._integrity import gunzip, read_data_file, read_npz
from ._paths import DataError, check_limit

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


def _check_labels(source: str, name: str, labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """``labels`` as int64 if they are a 1-D integer array within ``0..len(classes)-1``; else a
    :class:`DataError` naming ``source`` and the array ``name``."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{source}: {name} is {labels.dtype} {labels.shape}; expected a 1-D integer array "
                        f"of class indices 0..{len(classes) - 1}")
    bad = (labels < 0) | (labels >= len(classes))
    if bad.any():
        at = int(np.argmax(bad))
        raise DataError(f"{source}: {name} has label {int(labels[at])} at index {at}, outside "
                        f"0..{len(classes) - 1} ({int(bad.sum())} labels out of range); the file is damaged "
                        f"or not this data set")
    return labels.astype(np.int64)


def read_idx(path: Path, ndim: int, count: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (``ndim`` 1: labels, 3: images), gzip or plain.

    Keeps the first ``count`` items, but always reads and checks the whole file: the digest listed
    in the ``SHA256SUMS`` beside it (if any), every gzip CRC-32 and length trailer (for ``*.gz``),
    every header field, and that the data holds exactly the items the header declares, no byte
    more or less. A bad file raises :class:`DataError` naming it, the fault and the expected layout.
    """
    count = check_limit(count, "count")
    if isinstance(ndim, bool) or not isinstance(ndim, int) or ndim < 1:
        error = ValueError if isinstance(ndim, int) and not isinstance(ndim, bool) else TypeError
        raise error(f"ndim must be the number of dimensions of the IDX file, a positive int (1: labels, "
                    f"3: images), got {ndim!r}")
    items = _idx_items(path, ndim)
    return items[:count].copy()


def _idx_items(path: Path, ndim: int) -> np.ndarray:
    """All items of the IDX file ``path``, verified as :func:`read_idx` says (a read-only view)."""
    expected = (f"an IDX{ndim} unsigned-byte file (MNIST/Fashion-MNIST format: magic 0x000008{ndim:02x}, "
                f"{ndim} big-endian int32 dimensions, then the bytes), gzip-compressed if named *.gz")
    raw = read_data_file(path, expected)
    body = gunzip(path, raw) if path.suffix == ".gz" else raw
    header_len = 4 + 4 * ndim
    if len(body) < header_len:
        raise DataError(f"{path}: {len(body)} bytes, shorter than the {header_len}-byte header; "
                        f"expected {expected}")
    magic, *dims = (int(v) for v in np.frombuffer(body, dtype=">i4", count=1 + ndim))
    if magic != 0x800 + ndim:
        hint = " (the file is gzip data: name it *.gz)" if body[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{path}: magic number {magic:#010x}, not {0x800 + ndim:#010x}{hint}; "
                        f"expected {expected}")
    if any(d <= 0 for d in dims):
        raise DataError(f"{path}: bad dimensions {dims}; expected {expected}")
    item = int(np.prod(dims[1:], dtype=np.int64))
    size = dims[0] * item
    found = len(body) - header_len
    if found < size:
        raise DataError(f"{path}: truncated: {found} bytes of data where {size} were expected for "
                        f"{dims[0]} items of shape {tuple(dims[1:])}; the file is incomplete: copy it again")
    if found > size:
        raise DataError(f"{path}: {found - size} bytes after the {dims[0]} items of shape {tuple(dims[1:])} "
                        f"the header declares; the file is damaged or not in the expected format: "
                        f"{expected}")
    items = np.frombuffer(body, dtype=np.uint8, count=size, offset=header_len).reshape(dims)
    items.flags.writeable = False
    return items


def fashion_mnist(root: Path, limit: int | None = None) -> ImageDataset:
    """Fashion-MNIST from ``root/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    ``limit`` keeps the first ``limit`` train and test items (quick runs and tests); every file is
    still read and verified whole (see :func:`read_idx`).
    """
    limit = check_limit(limit)
    folder = root / "fashion-mnist"
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _idx_items(folder / f"{prefix}-images-idx3-ubyte.gz", 3)
        labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
        y = _check_labels(str(labels), "labels", _idx_items(labels, 1), FASHION_CLASSES)
        if len(x) != len(y):
            raise DataError(f"{folder}: {split} has {len(x)} images but {len(y)} labels")
        parts[split] = (x[:limit, :, :, None].copy(), y[:limit].copy())
    return ImageDataset("fashion-mnist", *parts["train"], *parts["test"], FASHION_CLASSES, str(folder))


# ----------------------------------------------------------------------------------------- CIFAR

_CIFAR_PICKLE = ("the python pickle batches of the official CIFAR-10 release (cifar-10-batches-py/"
                 "data_batch_1..5 and test_batch: dicts with b'data' (10000, 3072) uint8 CHW rows and "
                 "b'labels')")
_CIFAR_NPZ = ("an npz with train_x (N,32,32,3) uint8, train_y (N,) integer labels 0..9, test_x, test_y "
              "(the cifar10_lossless_partial.npz subset)")


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
    raw = read_data_file(path, _CIFAR_PICKLE)
    fh = io.BytesIO(raw)
    try:
        batch = _BatchUnpickler(fh, encoding="bytes").load()
    except Exception as exc:  # any unpickling failure is a format error of this file
        raise DataError(f"{path}: not a CIFAR-10 pickle batch ({type(exc).__name__}: {exc}); "
                        f"expected {_CIFAR_PICKLE}") from exc
    if fh.tell() != len(raw):
        raise DataError(f"{path}: {len(raw) - fh.tell()} bytes after the end of the pickled batch; the file "
                        f"is damaged or not in the expected format: {_CIFAR_PICKLE}")
    if not isinstance(batch, dict):
        raise DataError(f"{path}: holds a {type(batch).__name__}, not a dict; expected {_CIFAR_PICKLE}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: keys {sorted(map(str, batch))} lack data/labels; expected {_CIFAR_PICKLE}")
    data = np.asarray(data)
    labels = _check_labels(str(path), "labels", np.asarray(labels), CIFAR_CLASSES)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DataError(f"{path}: data {data.dtype} {data.shape} with {len(labels)} labels; "
                        f"expected {_CIFAR_PICKLE}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def _check_cifar_npz(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [k for k in ("train_x", "train_y", "test_x", "test_y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: no {', '.join(missing)} among the arrays {sorted(arrays)}; "
                        f"expected {_CIFAR_NPZ}")
    out = {}
    for split in ("train", "test"):
        x = arrays[f"{split}_x"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
            raise DataError(f"{path}: {split}_x is {x.dtype} {x.shape}; expected {_CIFAR_NPZ}")
        y = _check_labels(str(path), f"{split}_y", arrays[f"{split}_y"], CIFAR_CLASSES)
        if len(y) != len(x):
            raise DataError(f"{path}: {len(x)} {split}_x images but {len(y)} {split}_y labels; "
                            f"expected {_CIFAR_NPZ}")
        if f"{split}_idx" in arrays and f"{split}_labels_all" in arrays:
            # the subset records where its rows come from: their labels must agree with the full list
            name = f"{split}_labels_all"
            full = _check_labels(str(path), name, arrays[name], CIFAR_CLASSES)
            idx = arrays[f"{split}_idx"]
            in_range = idx.dtype.kind in "iu" and (not len(idx) or (idx.min() >= 0 and idx.max() < len(full)))
            if idx.shape != y.shape or not in_range or len(np.unique(idx)) != len(idx):
                raise DataError(f"{path}: {split}_idx ({idx.dtype} {idx.shape}) is not a list of distinct "
                                f"rows of {name} ({len(full)} labels), one per {split}_y label")
            wrong = np.flatnonzero(full[idx] != y)
            if len(wrong):
                raise DataError(f"{path}: {split}_y disagrees with {split}_labels_all[{split}_idx] at "
                                f"{len(wrong)} rows (first: row {int(wrong[0])}); the file is damaged")
        out[f"{split}_x"], out[f"{split}_y"] = x, y
    if "label_names" in arrays and tuple(str(v) for v in np.ravel(arrays["label_names"])) != CIFAR_CLASSES:
        raise DataError(f"{path}: label_names {arrays['label_names'].tolist()} are not the CIFAR-10 classes "
                        f"{list(CIFAR_CLASSES)} in order")
    return out


def cifar10(root: Path, limit: int | None = None) -> ImageDataset:
    """CIFAR-10: the official pickle batches if present, else the npz subset.

    Looks for ``root/cifar-10/cifar-10-batches-py/`` (or ``root/cifar-10-batches-py/``), then
    ``root/cifar-10/cifar10_lossless_partial.npz``. ``limit`` keeps the first items of each split;
    every file is still read and verified whole: its ``SHA256SUMS`` digest if listed, for the npz
    every member's zip CRC-32 and the archive layout, and the arrays' dtypes, shapes and labels.
    """
    limit = check_limit(limit)
    for folder in (root / "cifar-10" / "cifar-10-batches-py", root / "cifar-10-batches-py"):
        if folder.is_dir():
            train = [_read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
            tx, ty = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
            ex, ey = _read_cifar_batch(folder / "test_batch")
            return _cifar_dataset(tx, ty, ex, ey, limit, str(folder))
    path = root / "cifar-10" / "cifar10_lossless_partial.npz"
    raw = read_data_file(path, f"{_CIFAR_PICKLE} in {root / 'cifar-10' / 'cifar-10-batches-py'}, or "
                               f"{_CIFAR_NPZ}")
    arrays = _check_cifar_npz(path, read_npz(path, raw, _CIFAR_NPZ))
    return _cifar_dataset(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"], limit,
                          str(path))


def _cifar_dataset(tx: np.ndarray, ty: np.ndarray, ex: np.ndarray, ey: np.ndarray, limit: int | None,
                   source: str) -> ImageDataset:
    if limit is not None:
        tx, ty, ex, ey = tx[:limit], ty[:limit], ex[:limit], ey[:limit]
    return ImageDataset("cifar10", tx, ty, ex, ey, CIFAR_CLASSES, source)
