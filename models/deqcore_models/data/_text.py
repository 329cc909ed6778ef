from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._integrity import read_data_file
from ._paths import DataError, check_limit

EOS = "<eos>"
UNK = "<unk>"


@dataclass(frozen=True)
class TextCorpus:
    """A tokenised corpus: ``vocab`` (id -> token) and int64 id arrays per split.

    ``level`` is ``"word"`` or ``"char"``. ``unknown`` counts valid/test tokens that were not in
    the train vocabulary and were mapped to ``<unk>`` (always 0 for the shipped corpora).
    """

    name: str
    level: str
    vocab: tuple[str, ...]
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    unknown: int
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: np.ndarray) -> str:
        sep = " " if self.level == "word" else ""
        return sep.join(self.vocab[int(i)] for i in np.asarray(ids).ravel())


def _read_text(path: Path, expected: str) -> str:
    """The whole file as text, verified: its ``SHA256SUMS`` digest if listed, UTF-8, no NUL bytes."""
    raw = read_data_file(path, expected)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); expected {expected}") from exc
    nul = raw.find(0)
    if nul >= 0:
        raise DataError(f"{path}: NUL byte at byte {nul}, which text never holds (a zero-filled, damaged "
                        f"region?); copy the file again. Expected {expected}")
    if not text.strip():
        raise DataError(f"{path}: empty; expected {expected}")
    return text


def wikitext2(root: Path, limit: int | None = None) -> TextCorpus:
    """Word-level WikiText-2 from ``root/wikitext-2/{train,valid,test}.txt``.

    Each line is split on whitespace and ends with ``<eos>`` (empty lines give a lone ``<eos>``);
    the vocabulary is built from train in order of first appearance; valid/test tokens missing
    from it become ``<unk>``. ``limit`` keeps the first ``limit`` lines of each file; every file is
    still read and verified whole (its ``SHA256SUMS`` digest if listed, UTF-8).
    """
    limit = check_limit(limit)
    expected = ("tokenised WikiText-2 text, UTF-8, one paragraph per line, words separated by spaces "
                "(the copy of pytorch/examples word_language_model/data/wikitext-2)")
    folder = root / "wikitext-2"
    words: dict[str, list[str]] = {}
    for split in ("train", "valid", "test"):
        lines = _read_text(folder / f"{split}.txt", expected).splitlines()
        if limit is not None:
            lines = lines[:limit]
        words[split] = [w for line in lines for w in (*line.split(), EOS)]
    index: dict[str, int] = {}
    for w in words["train"]:
        index.setdefault(w, len(index))
    unknown = 0
    ids = {}
    for split, toks in words.items():
        if split == "train":
            ids[split] = np.fromiter((index[w] for w in toks), dtype=np.int64, count=len(toks))
            continue
        missing = sum(1 for w in toks if w not in index)
        if missing and UNK not in index:
            raise DataError(f"{folder / (split + '.txt')}: {missing} tokens are not in the train "
                            f"vocabulary, which has no {UNK} to map them to")
        unknown += missing
        unk = index.get(UNK, -1)
        ids[split] = np.fromiter((index.get(w, unk) for w in toks), dtype=np.int64, count=len(toks))
    return TextCorpus("wikitext-2", "word", tuple(index), ids["train"], ids["valid"], ids["test"],
                      unknown, str(folder))


def char_corpus(path: Path, splits: tuple[float, float] = (0.9, 0.05),
                limit: int | None = None) -> TextCorpus:
    """A character-level corpus from one UTF-8 file (tiny-shakespeare: ``root/tiny-shakespeare/input.txt``).

    The text is cut, in order, into train / valid / test at the fractions ``splits`` (train,
    valid; test is the rest). The vocabulary is the sorted set of characters of the whole file, so
    every split is encodable. ``limit`` keeps the first ``limit`` characters; the whole file is
    still read and verified (its ``SHA256SUMS`` digest if listed, UTF-8).
    """
    limit = check_limit(limit)
    text = _read_text(path, "a UTF-8 text file (character-level corpus)")
    if limit is not None:
        text = text[:limit]
    train_frac, valid_frac = splits
    if not (0 < train_frac < 1 and 0 <= valid_frac < 1 - train_frac):
        raise ValueError(f"splits must satisfy 0 < train < 1 and 0 <= valid < 1 - train, got {splits}")
    vocab = tuple(sorted(set(text)))
    table = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((table[c] for c in text), dtype=np.int64, count=len(text))
    a = int(len(ids) * train_frac)
    b = a + int(len(ids) * valid_frac)
    return TextCorpus(path.parent.name or path.stem, "char", vocab, ids[:a], ids[a:b], ids[b:], 0, str(path))


def tiny_shakespeare(root: Path, limit: int | None = None) -> TextCorpus:
    """tiny-shakespeare (``root/tiny-shakespeare/input.txt``) at the 90/5/5 split of :func:`char_corpus`."""
    return char_corpus(root / "tiny-shakespeare" / "input.txt", limit=limit)


def batchify(ids: np.ndarray, batch: int) -> np.ndarray:
    """Cut a token stream into ``batch`` contiguous rows, (batch, T), dropping the remainder.

    Row b continues where row b left off in the next segment, which is what a segment memory
    (Transformer-XL style) needs.
    """
    if batch <= 0:
        raise ValueError(f"batch must be positive, got {batch}")
    per_row = len(ids) // batch
    if per_row < 2:
        raise ValueError(f"{len(ids)} tokens cannot fill {batch} rows of at least 2 tokens")
    return np.ascontiguousarray(ids[: per_row * batch].reshape(batch, per_row))


def segments(rows: np.ndarray, length: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Successive (input, target) windows of ``length`` columns from batchified ``rows``; the
    target is the input shifted by one token. The last window may be shorter."""
    if length <= 0:
        raise ValueError(f"segment length must be positive, got {length}")
    for start in range(0, rows.shape[1] - 1, length):
        stop = min(start + length, rows.shape[1] - 1)
        yield rows[:, start:stop], rows[:, start + 1: stop + 1]
