"""Data loaders for deqcore's experiments: local files only, never downloaded.

Every loader takes the data folder (see :func:`data_dir`: a ``--data`` flag or ``$DEQCORE_DATA``)
and returns NumPy arrays, so the same batches feed the PyTorch and the JAX models. Every data file is
read whole and verified before use, also when ``limit`` keeps only the first items: its SHA-256
against the ``SHA256SUMS`` beside it when that lists it, and always its structure (gzip and zip
CRC-32s, exact sizes with no trailing bytes, array dtypes and shapes, label ranges, UTF-8 text). A
missing, corrupted or malformed file raises :class:`DataError` naming the file, the fault and the fix.
"""

from ._images import (
    CIFAR_CLASSES,
    FASHION_CLASSES,
    ImageDataset,
    cifar10,
    fashion_mnist,
    read_idx,
    to_float_nchw,
)
from ._paths import DATA_ENV, DataError, data_dir, require_file
from ._text import EOS, UNK, TextCorpus, batchify, char_corpus, segments, tiny_shakespeare, wikitext2

__all__ = [
    "CIFAR_CLASSES", "DATA_ENV", "EOS", "FASHION_CLASSES", "UNK", "DataError", "ImageDataset",
    "TextCorpus", "batchify", "char_corpus", "cifar10", "data_dir", "fashion_mnist", "read_idx",
    "require_file", "segments", "tiny_shakespeare", "to_float_nchw", "wikitext2",
]
