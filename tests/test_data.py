"""Data loaders on the real files of ../shared/data, and their errors on missing or corrupt files."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
from deqcore_models import data as D


def test_data_dir_flag_env_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(D.DATA_ENV, raising=False)
    with pytest.raises(D.DataError, match="--data DIR or set the environment variable DEQCORE_DATA"):
        D.data_dir()
    assert D.data_dir(tmp_path) == tmp_path
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path))
    assert D.data_dir() == tmp_path
    assert D.data_dir(tmp_path / "..") == tmp_path / ".."  # the flag wins over the variable
    with pytest.raises(D.DataError, match=r"nowhere \(from --data\) does not exist"):
        D.data_dir(tmp_path / "nowhere")
    monkeypatch.setenv(D.DATA_ENV, str(tmp_path / "gone"))
    with pytest.raises(D.DataError, match=r"\(from \$DEQCORE_DATA\)"):
        D.data_dir()


def test_fashion_mnist(data_root):
    ds = D.fashion_mnist(data_root)
    assert ds.train_x.shape == (60000, 28, 28, 1) and ds.test_x.shape == (10000, 28, 28, 1)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int64
    # the release is balanced: 6000 train and 1000 test images per class
    assert np.bincount(ds.train_y).tolist() == [6000] * 10
    assert np.bincount(ds.test_y).tolist() == [1000] * 10
    assert ds.shape == (1, 28, 28) and len(ds.classes) == 10
    assert 0 < ds.train_x.mean() < 255
    small = D.fashion_mnist(data_root, limit=100)
    np.testing.assert_array_equal(small.test_x, ds.test_x[:100])
    np.testing.assert_array_equal(small.train_y, ds.train_y[:100])


def _copy_fashion(data_root, tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for name in os.listdir(data_root / "fashion-mnist"):
        (folder / name).write_bytes((data_root / "fashion-mnist" / name).read_bytes())
    return folder


def test_fashion_mnist_missing_and_corrupt_files(data_root, tmp_path):
    folder = _copy_fashion(data_root, tmp_path)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    with pytest.raises(D.DataError, match=r"data file not found: .*t10k-labels-idx1-ubyte\.gz(.|\n)*IDX1"):
        D.fashion_mnist(tmp_path)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte\.gz: cannot read .*BadGzipFile"):
        D.fashion_mnist(tmp_path)
    labels.write_bytes(gzip.compress(np.array([0x803, 10], ">i4").tobytes() + bytes(10)))
    with pytest.raises(D.DataError, match=r"magic number 0x00000803, not 0x00000801"):
        D.fashion_mnist(tmp_path)
    labels.write_bytes(gzip.compress(np.array([0x801, 10000], ">i4").tobytes() + bytes(50)))
    with pytest.raises(D.DataError, match=r"truncated: 50 bytes of data where 10000 were expected"):
        D.fashion_mnist(tmp_path)
    labels.write_bytes(gzip.compress(np.array([0x801, 10000], ">i4").tobytes() + bytes(10000)))
    images = folder / "t10k-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(np.array([0x803, 5, 28, 28], ">i4").tobytes() + bytes(5 * 784)))
    with pytest.raises(D.DataError, match="test has 5 images but 10000 labels"):
        D.fashion_mnist(tmp_path)


def test_cifar10_npz_subset(data_root):
    ds = D.cifar10(data_root)
    assert ds.source.endswith("cifar10_lossless_partial.npz")
    assert ds.train_x.shape == (4660, 32, 32, 3) and ds.test_x.shape == (4559, 32, 32, 3)
    counts = np.bincount(ds.test_y, minlength=10)
    assert counts[[0, 1, 8, 9]].tolist() == [1000] * 4  # the classes the subset keeps complete
    assert ds.shape == (3, 32, 32) and ds.classes[0] == "airplane"


def _write_batches(folder, x, y, per_batch):
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        rows = slice(k * per_batch, (k + 1) * per_batch)
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y[rows]],
                 b"data": x[rows].transpose(0, 3, 1, 2).reshape(-1, 3072).copy(),
                 b"filenames": [b"f.png"] * per_batch}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)


def test_cifar10_pickle_batches_match_the_pixels(data_root, tmp_path):
    """The official pickle layout (CHW rows, bytes keys), written from the npz pixels, loads back
    to exactly those pixels in HWC order."""
    subset = D.cifar10(data_root)
    _write_batches(tmp_path / "cifar-10" / "cifar-10-batches-py", subset.train_x, subset.train_y, 40)
    ds = D.cifar10(tmp_path)
    assert ds.source.endswith("cifar-10-batches-py")
    np.testing.assert_array_equal(ds.train_x, subset.train_x[:200])
    np.testing.assert_array_equal(ds.train_y, subset.train_y[:200])
    np.testing.assert_array_equal(ds.test_x, subset.train_x[200:240])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar10_pickle_refuses_code_and_names_bad_files(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(D.DataError, match=r"data_batch_1: not a CIFAR-10 pickle batch .*refusing to load"):
        D.cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((3, 10), np.uint8),
                                                        b"labels": [0, 1, 2]}))
    with pytest.raises(D.DataError, match=r"data_batch_1: data uint8 \(3, 10\) with 3 labels"):
        D.cifar10(tmp_path)
    with pytest.raises(D.DataError, match=r"data file not found: .*cifar10_lossless_partial\.npz"):
        D.cifar10(tmp_path / "empty")


def test_wikitext2(data_root):
    wt = D.wikitext2(data_root)
    # token counts and vocabulary of the release (pytorch/examples' copy)
    assert (len(wt.train), len(wt.valid), len(wt.test)) == (2088628, 217646, 245569)
    assert wt.vocab_size == 33278 and wt.unknown == 0
    lines = (data_root / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()
    eos = wt.vocab.index(D.EOS)
    assert int((wt.valid == eos).sum()) == len(lines)
    first = next(line for line in lines if line.strip())
    start = lines.index(first)
    assert wt.decode(wt.valid[start: start + len(first.split())]) == " ".join(first.split())


def test_wikitext2_unknown_words_and_bad_files(tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    (folder / "train.txt").write_text("a b <unk>\n\nb c\n", encoding="utf-8")
    (folder / "valid.txt").write_text("a z\n", encoding="utf-8")
    (folder / "test.txt").write_text("c\n", encoding="utf-8")
    wt = D.wikitext2(tmp_path)
    assert wt.vocab == ("a", "b", "<unk>", D.EOS, "c")
    assert wt.train.tolist() == [0, 1, 2, 3, 3, 1, 4, 3] and wt.valid.tolist() == [0, 2, 3]
    assert wt.unknown == 1
    (folder / "train.txt").write_text("a b\n", encoding="utf-8")
    with pytest.raises(D.DataError, match="1 tokens are not in the train vocabulary, which has no <unk>"):
        D.wikitext2(tmp_path)
    (folder / "test.txt").write_bytes(b"\xff\xfe bad")
    (folder / "valid.txt").write_text("a\n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"test\.txt: not UTF-8 text"):
        D.wikitext2(tmp_path)
    (folder / "test.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(D.DataError, match=r"test\.txt: empty"):
        D.wikitext2(tmp_path)


def test_tiny_shakespeare_round_trip(data_root):
    cs = D.tiny_shakespeare(data_root)
    text = (data_root / "tiny-shakespeare" / "input.txt").read_text(encoding="utf-8")
    assert cs.vocab_size == 65 and cs.level == "char"
    assert len(cs.train) + len(cs.valid) + len(cs.test) == len(text) == 1115394
    assert len(cs.train) == int(0.9 * len(text))
    assert cs.decode(np.concatenate([cs.train, cs.valid, cs.test])) == text
    with pytest.raises(ValueError, match="splits must satisfy"):
        D.char_corpus(data_root / "tiny-shakespeare" / "input.txt", splits=(0.9, 0.2))


def test_batchify_and_segments():
    ids = np.arange(23)
    rows = D.batchify(ids, 4)
    assert rows.shape == (4, 5) and rows[1].tolist() == [5, 6, 7, 8, 9]
    pairs = list(D.segments(rows, 3))
    assert [p[0].shape[1] for p in pairs] == [3, 1]
    for inp, tgt in pairs:
        np.testing.assert_array_equal(tgt, inp + 1)
    with pytest.raises(ValueError, match="cannot fill 12 rows"):
        D.batchify(ids, 12)


def test_to_float_nchw():
    img = np.array([[[[0, 255, 51]]]], dtype=np.uint8)  # one 1x1 RGB image
    out = D.to_float_nchw(img, mean=[0.0, 0.5, 0.2], std=[1.0, 0.5, 0.1])
    assert out.shape == (1, 3, 1, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 1.0, 0.0], atol=1e-6)
