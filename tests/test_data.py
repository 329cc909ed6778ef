"""Data loaders on the real files of ../shared/data, and their errors on missing or corrupt files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import zipfile
import zlib

import numpy as np
import pytest
from deqcore_models import data as D
from deqcore_models.data import _integrity


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


def _copy_set(data_root, tmp_path, name, sums=True, only=None):
    """A writable copy of the real data set folder ``name`` (the originals are read-only); without
    its SHA256SUMS when ``sums`` is false, so only the structural checks stand between a fault and
    the data."""
    folder = tmp_path / name
    folder.mkdir(parents=True)
    for entry in os.listdir(data_root / name):
        if (entry == "SHA256SUMS" and not sums) or (only is not None and entry not in (*only, "SHA256SUMS")):
            continue
        shutil.copyfile(data_root / name / entry, folder / entry)
    return folder


def _flip(path, offset, mask=0x01):
    raw = bytearray(path.read_bytes())
    raw[offset] ^= mask
    path.write_bytes(bytes(raw))


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fashion_mnist_missing_and_corrupt_files(data_root, tmp_path):
    folder = _copy_set(data_root, tmp_path, "fashion-mnist", sums=False)
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    with pytest.raises(D.DataError, match=r"data file not found: .*t10k-labels-idx1-ubyte\.gz(.|\n)*IDX1"):
        D.fashion_mnist(tmp_path)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(D.DataError, match=r"labels-idx1-ubyte\.gz: gzip member at byte 0: not gzip data"):
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


# ------------------------------------------------------------------ integrity: real faults on real copies

T10K_IMAGES, T10K_LABELS = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"


def test_fashion_mnist_copies_load_equal_to_the_originals(data_root, tmp_path):
    """Unmodified copies, verified against their SHA256SUMS and, in a second folder without it,
    by structure only, give exactly the original arrays."""
    ref = D.fashion_mnist(data_root)
    _copy_set(data_root, tmp_path / "a", "fashion-mnist")
    _copy_set(data_root, tmp_path / "b", "fashion-mnist", sums=False)
    for root in (tmp_path / "a", tmp_path / "b"):
        ds = D.fashion_mnist(root)
        for field in ("train_x", "train_y", "test_x", "test_y"):
            np.testing.assert_array_equal(getattr(ds, field), getattr(ref, field))
        assert ds.train_x.flags.writeable and ds.test_y.flags.writeable
    small = D.fashion_mnist(tmp_path / "a", limit=7)
    np.testing.assert_array_equal(small.train_x, ref.train_x[:7])
    np.testing.assert_array_equal(small.test_y, ref.test_y[:7])


def _silent_deflate_flip(raw, start=0, stop=None, wbits=31):
    """An offset in the middle of the deflate stream ``raw[start:stop]`` (gzip: ``wbits`` 31, raw
    deflate as in zip members: -15) where flipping one bit still decodes to data of the full
    length, so that only the CRC-32 tells."""
    stop = len(raw) if stop is None else stop
    good = zlib.decompress(raw[start:stop], wbits)
    for offset in range((start + stop) // 2, stop):
        bad = bytearray(raw[start:stop])
        bad[offset - start] ^= 0x01
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(bytes(bad))
        except zlib.error as exc:
            if "incorrect data check" in str(exc):
                return offset
            continue
        if wbits < 0 and inflater.eof and len(out) == len(good) and out != good:
            return offset
    raise AssertionError("no silent flip found")


def test_flipped_byte_in_the_deflate_stream_is_caught(data_root, tmp_path):
    folder = _copy_set(data_root, tmp_path, "fashion-mnist", sums=False)
    images = folder / T10K_IMAGES
    original = images.read_bytes()
    offset = _silent_deflate_flip(original)
    _flip(images, offset)
    # the fault is real: raw inflation (no trailer check) gives the full length, with other pixels
    good = zlib.decompressobj(-15).decompress(original[10:])
    wrong = zlib.decompressobj(-15).decompress(images.read_bytes()[10:])
    assert len(wrong) == len(good) == 16 + 10000 * 784 and wrong != good
    crc = r"t10k-images-idx3-ubyte\.gz: gzip member at byte 0: the CRC-32 in the gzip trailer does not match"
    with pytest.raises(D.DataError, match=crc):
        D.read_idx(images, 3)
    with pytest.raises(D.DataError, match=crc):  # limit/count read the first items only: still verified whole
        D.read_idx(images, 3, count=5)
    with pytest.raises(D.DataError, match=crc):
        D.fashion_mnist(tmp_path, limit=5)
    # with the shipped SHA256SUMS the digest names the fault first
    shutil.copyfile(data_root / "fashion-mnist" / "SHA256SUMS", folder / "SHA256SUMS")
    actual, listed = _sha(images)[:12], _sha(data_root / "fashion-mnist" / T10K_IMAGES)[:12]
    with pytest.raises(D.DataError, match=rf"{T10K_IMAGES}: SHA-256 {actual}\.\.\. differs from "
                                          rf"{listed}\.\.\. listed for it in .*SHA256SUMS:1"):
        D.fashion_mnist(tmp_path, limit=5)


@pytest.mark.parametrize("fault, message", [
    ("crc", r"the CRC-32 in the gzip trailer does not match the decompressed data"),
    ("isize", r"the length in the gzip trailer does not match the decompressed data"),
    ("cut-trailer", r"the gzip data ends early: the member at byte 0 has no end"),
    ("cut-half", r"the gzip data ends early"),
    ("append-zeros", r"3 bytes after the end of the gzip data \(from byte 5125\)"),
    ("append-member", r"2 bytes after the 10000 items of shape \(\) the header declares"),
])
def test_gzip_trailer_truncation_and_trailing_bytes(data_root, tmp_path, fault, message):
    folder = _copy_set(data_root, tmp_path, "fashion-mnist", sums=False, only=[T10K_LABELS])
    labels = folder / T10K_LABELS
    raw = labels.read_bytes()
    assert len(raw) == 5125
    bad = {"crc": lambda: raw[:-6] + bytes([raw[-6] ^ 0xFF]) + raw[-5:],
           "isize": lambda: raw[:-2] + bytes([raw[-2] ^ 0x01]) + raw[-1:],
           "cut-trailer": lambda: raw[:-8],
           "cut-half": lambda: raw[: len(raw) // 2],
           "append-zeros": lambda: raw + bytes(3),
           "append-member": lambda: raw + gzip.compress(b"\x01\x02")}[fault]()
    labels.write_bytes(bad)
    with pytest.raises(D.DataError, match=rf"{T10K_LABELS}: .*{message}"):
        D.read_idx(labels, 1, count=3)


def test_gzip_in_several_members_is_valid(data_root, tmp_path):
    """Concatenated gzip members are one valid gzip file: every member is checked and the data joined."""
    payload = gzip.decompress((data_root / "fashion-mnist" / T10K_LABELS).read_bytes())
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(payload[:4000]) + gzip.compress(payload[4000:]))
    ref = D.read_idx(data_root / "fashion-mnist" / T10K_LABELS, 1)
    np.testing.assert_array_equal(D.read_idx(path, 1), ref)
    second = path.read_bytes()
    path.write_bytes(second[:-1] + bytes([second[-1] ^ 1]))  # the second member's length trailer
    with pytest.raises(D.DataError, match=r"gzip member at byte \d+: the length in the gzip trailer"):
        D.read_idx(path, 1)


def test_plain_idx_has_exactly_the_declared_bytes(data_root, tmp_path):
    payload = gzip.decompress((data_root / "fashion-mnist" / T10K_LABELS).read_bytes())
    ref = D.read_idx(data_root / "fashion-mnist" / T10K_LABELS, 1)
    path = tmp_path / "labels-idx1-ubyte"
    path.write_bytes(payload)
    np.testing.assert_array_equal(D.read_idx(path, 1), ref)
    np.testing.assert_array_equal(D.read_idx(path, 1, count=4), ref[:4])
    path.write_bytes(payload + b"\x00")
    with pytest.raises(D.DataError, match=r"labels-idx1-ubyte: 1 bytes after the 10000 items"):
        D.read_idx(path, 1, count=4)
    path.write_bytes(payload[:-1])
    with pytest.raises(D.DataError, match=r"truncated: 9999 bytes of data where 10000 were expected"):
        D.read_idx(path, 1, count=4)
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(D.DataError, match=r"magic number 0x1f8b08.*\(the file is gzip data: name it \*\.gz"):
        D.read_idx(path, 1)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"count must be a positive int or None .*, got {bad}$"):
            D.read_idx(path, 1, count=bad)
    with pytest.raises(ValueError, match=r"ndim must be .* a positive int .*got 0$"):
        D.read_idx(path, 0)


def test_sha256sums_digest_mismatch_and_line_formats(data_root, tmp_path):
    folder = _copy_set(data_root, tmp_path, "fashion-mnist", only=[T10K_LABELS])
    labels, sums = folder / T10K_LABELS, folder / "SHA256SUMS"
    real = _sha(labels)
    wrong = ("0" if real[0] != "0" else "1") + real[1:]
    sums.write_text(f"{wrong}  {T10K_LABELS}\n")
    with pytest.raises(D.DataError, match=rf"{T10K_LABELS}: SHA-256 {real[:12]}\.\.\. differs from "
                                          rf"{wrong[:12]}\.\.\. listed for it in .*SHA256SUMS:1; .*"
                                          rf"sha256sum {T10K_LABELS}"):
        D.read_idx(labels, 1)
    # every form sha256sum writes, comments and blank lines are accepted
    for line in (f"{real}  {T10K_LABELS}", f"{real} *{T10K_LABELS}", f"{real.upper()}  ./{T10K_LABELS}",
                 f"SHA256 ({T10K_LABELS}) = {real}",
                 f"# digests\n\n{real}  {T10K_LABELS}\n{real}  {T10K_LABELS}"):
        sums.write_text(line + "\n")
        assert len(D.read_idx(labels, 1)) == 10000
    sums.write_text(f"{real}  {T10K_LABELS}\n{real}  other.gz\nd41d8cd98f00b204  short.gz\n")
    with pytest.raises(D.DataError, match=r"SHA256SUMS:3: malformed line 'd41d8cd98f00b204  short\.gz'; "
                                          r"expected '<64 hex digits>  <file name>'"):
        D.read_idx(labels, 1)
    sums.write_text(f"{real}  {T10K_LABELS}\n{wrong}  {T10K_LABELS}\n")
    with pytest.raises(D.DataError, match=rf"SHA256SUMS:2: {T10K_LABELS} is listed again with another"):
        D.read_idx(labels, 1)
    # a file the list does not name is checked by structure only
    sums.write_text(f"{real}  other.gz\n")
    assert len(D.read_idx(labels, 1)) == 10000
    sums.unlink()
    sums.mkdir()
    with pytest.raises(D.DataError, match="SHA256SUMS: not a file"):
        D.read_idx(labels, 1)


def test_verified_files_are_hashed_once_until_they_change(data_root, tmp_path, monkeypatch):
    folder = _copy_set(data_root, tmp_path, "fashion-mnist", only=[T10K_LABELS])
    labels = folder / T10K_LABELS
    calls = []
    real_sha256 = hashlib.sha256

    def counting_sha256(*args):
        calls.append(1)
        return real_sha256(*args)

    monkeypatch.setattr(_integrity.hashlib, "sha256", counting_sha256)
    D.read_idx(labels, 1)
    D.read_idx(labels, 1, count=2)
    assert len(calls) == 1
    # the same size, a new modification time: hashed again, and the change is found
    st = os.stat(labels)
    _flip(labels, -6)
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(D.DataError, match="SHA-256 .* differs from"):
        D.read_idx(labels, 1)
    assert len(calls) == 2


def test_limit_is_validated_once_for_every_loader(data_root):
    for loader in (D.fashion_mnist, D.cifar10, D.wikitext2, D.tiny_shakespeare):
        with pytest.raises(ValueError, match=r"limit must be a positive int or None \(all items\), got -1"):
            loader(data_root, limit=-1)
        with pytest.raises(TypeError, match=r"limit must be a positive int or None \(all items\), got float"):
            loader(data_root, limit=2.5)
        with pytest.raises(TypeError, match="got bool"):
            loader(data_root, limit=True)


# ------------------------------------------------------------------------------ integrity: CIFAR-10

NPZ = "cifar10_lossless_partial.npz"


def _member_span(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = path.read_bytes()
    at = info.header_offset
    name_len, extra_len = (int.from_bytes(raw[at + i: at + i + 2], "little") for i in (26, 28))
    start = at + 30 + name_len + extra_len
    return raw, start, start + info.compress_size


@pytest.mark.parametrize("member", ["test_y.npy", "test_idx.npy"])
def test_cifar10_corrupted_npz_member(data_root, tmp_path, member):
    """A flipped byte in a member that still inflates to the full length, also in a member the
    loader does not return, fails that member's zip CRC-32; with the shipped SHA256SUMS the digest
    catches it first."""
    ref = D.cifar10(data_root)
    folder = _copy_set(data_root, tmp_path, "cifar-10", sums=False)
    path = folder / NPZ
    ds = D.cifar10(tmp_path)  # the unmodified copy
    np.testing.assert_array_equal(ds.train_x, ref.train_x)
    np.testing.assert_array_equal(ds.test_y, ref.test_y)
    raw, start, stop = _member_span(path, member)
    _flip(path, _silent_deflate_flip(raw, start, stop, wbits=-15))
    with pytest.raises(D.DataError, match=rf"{NPZ}: member {member} is corrupted \(BadZipFile: Bad CRC-32"):
        D.cifar10(tmp_path, limit=3)
    _flip(path, start, mask=0xFF)  # and the first block header: the deflate stream itself breaks
    with pytest.raises(D.DataError, match=rf"{NPZ}: member {member} is corrupted \(error: Error -3"):
        D.cifar10(tmp_path, limit=3)
    shutil.copyfile(data_root / "cifar-10" / "SHA256SUMS", folder / "SHA256SUMS")
    with pytest.raises(D.DataError, match=rf"{NPZ}: SHA-256 {_sha(path)[:12]}\.\.\. differs from 508ac277ba"):
        D.cifar10(tmp_path, limit=3)


def test_cifar10_npz_with_bytes_after_the_archive(data_root, tmp_path):
    folder = _copy_set(data_root, tmp_path, "cifar-10", sums=False)
    path = folder / NPZ
    size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b"\x00" * 5)
    with pytest.raises(D.DataError,
                       match=rf"{NPZ}: 5 bytes after the end of the zip archive \(from byte {size}\)"):
        D.cifar10(tmp_path)
    path.write_bytes(path.read_bytes()[: size // 2])
    with pytest.raises(D.DataError, match=rf"{NPZ}: not a readable zip/npz archive"):
        D.cifar10(tmp_path)


def _subset(rng, n=12):
    y = rng.integers(0, 10, n)
    return dict(train_x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), train_y=y,
                test_x=rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), test_y=y[:5],
                train_idx=np.arange(n) * 2, train_labels_all=np.repeat(y, 2),
                label_names=np.array(D.CIFAR_CLASSES))


def _npz_bytes(arrays, compressed=False):
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def test_cifar10_npz_structure(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10"
    folder.mkdir()
    path = folder / NPZ
    good = _subset(rng)
    for compressed in (False, True):
        path.write_bytes(_npz_bytes(good, compressed))
        ds = D.cifar10(tmp_path)
        np.testing.assert_array_equal(ds.train_x, good["train_x"])
        assert ds.test_y.dtype == np.int64 and ds.test_y.tolist() == good["test_y"].tolist()
    cases = [
        (dict(train_y=good["train_y"].astype(np.float32)), r"train_y is float32 \(12,\); expected a 1-D int"),
        (dict(test_y=np.array([0, 1, 10, 3, 4])), r"test_y has label 10 at index 2, outside 0\.\.9"),
        (dict(test_x=good["test_x"].astype(np.int16)), r"test_x is int16 \(5, 32, 32, 3\)"),
        (dict(train_x=good["train_x"][:, :, :16]), r"train_x is uint8 \(12, 32, 16, 3\)"),
        (dict(train_y=good["train_y"][:11]), r"12 train_x images but 11 train_y labels"),
        (dict(train_labels_all=np.repeat(good["train_y"], 2)[::-1].copy()),
         r"train_y disagrees with train_labels_all\[train_idx\] at \d+ rows"),
        (dict(train_idx=np.zeros(12, np.int64)), r"train_idx \(int64 \(12,\)\) is not a list of distinct"),
        (dict(label_names=np.array(D.CIFAR_CLASSES[::-1])), r"label_names .* are not the CIFAR-10 classes"),
        (dict(test_y=None), r"no test_y among the arrays"),
    ]
    for change, message in cases:
        arrays = {k: v for k, v in {**good, **change}.items() if v is not None}
        path.write_bytes(_npz_bytes(arrays))
        with pytest.raises(D.DataError, match=rf"{NPZ}: {message}"):
            D.cifar10(tmp_path)


def test_npz_members_and_layout(tmp_path):
    good = _subset(np.random.default_rng(1))
    folder = tmp_path / "cifar-10"
    folder.mkdir()
    path = folder / NPZ

    def archive(extra_member=None, tail=b""):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for k, v in good.items():
                with zf.open(f"{k}.npy", "w") as fh:
                    np.lib.format.write_array(fh, v)
                    if k == "train_y":
                        fh.write(tail)
            if extra_member:
                zf.writestr(*extra_member)
        return buf.getvalue()

    path.write_bytes(archive())
    assert len(D.cifar10(tmp_path).train_x) == 12
    path.write_bytes(archive(tail=b"\x07\x07"))
    with pytest.raises(D.DataError, match=r"member train_y\.npy has 2 bytes after its int64 \(12,\) array"):
        D.cifar10(tmp_path)
    path.write_bytes(archive(extra_member=("notes.txt", "hello")))
    with pytest.raises(D.DataError, match=r"member 'notes\.txt' is not a \.npy array"):
        D.cifar10(tmp_path)
    obj = io.BytesIO()
    np.lib.format.write_array(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path.write_bytes(archive(extra_member=("meta.npy", obj.getvalue())))
    with pytest.raises(D.DataError,
                       match=r"member meta\.npy is not a valid \.npy array \(ValueError: .*pickle"):
        D.cifar10(tmp_path)
    path.write_bytes(b"PK" + archive())
    with pytest.raises(D.DataError, match=r"2 unaccounted bytes at byte 0, before member train_x\.npy"):
        D.cifar10(tmp_path)


def test_npz_data_descriptors_and_zip64_records(tmp_path, monkeypatch):
    """Archives written to a stream (data descriptors after each member) and with zip64 end
    records are valid: the layout check accounts for those records."""

    class Stream(io.RawIOBase):
        def __init__(self):
            self.data = bytearray()

        def writable(self):
            return True

        def write(self, b):
            self.data += b
            return len(b)

    good = _subset(np.random.default_rng(2))
    stream = Stream()
    with zipfile.ZipFile(stream, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for k, v in good.items():
            with zf.open(f"{k}.npy", "w", force_zip64=k == "train_x") as fh:
                np.lib.format.write_array(fh, v)
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 2)  # forces the zip64 end records
    zip64 = _npz_bytes(good)
    assert b"PK\x06\x06" in zip64
    for raw in (bytes(stream.data), zip64):
        arrays = _integrity.read_npz(tmp_path / "x.npz", raw, "an npz")
        assert sorted(arrays) == sorted(good)
        np.testing.assert_array_equal(arrays["train_x"], good["train_x"])
        with pytest.raises(D.DataError, match=r"x\.npz: 1 bytes after the end of the zip archive"):
            _integrity.read_npz(tmp_path / "x.npz", raw + b"\x00", "an npz")


def test_cifar10_pickle_batch_faults(data_root, tmp_path):
    subset = D.cifar10(data_root)
    folder = tmp_path / "cifar-10" / "cifar-10-batches-py"
    _write_batches(folder, subset.train_x, subset.train_y, 10)
    ref = D.cifar10(tmp_path)
    batch = folder / "data_batch_3"
    good = batch.read_bytes()
    batch.write_bytes(good + b"\x00\x00")
    with pytest.raises(D.DataError, match=r"data_batch_3: 2 bytes after the end of the pickled batch"):
        D.cifar10(tmp_path, limit=1)
    batch.write_bytes(good[:-100])
    with pytest.raises(D.DataError, match=r"data_batch_3: not a CIFAR-10 pickle batch"):
        D.cifar10(tmp_path, limit=1)
    for labels, message in (([0] * 9 + [10], r"labels has label 10 at index 9, outside 0\.\.9"),
                            ([0.5] * 10, r"labels is float64 \(10,\); expected a 1-D integer array")):
        batch.write_bytes(pickle.dumps({b"data": subset.train_x[:10].transpose(0, 3, 1, 2).reshape(10, 3072),
                                        b"labels": labels}))
        with pytest.raises(D.DataError, match=rf"data_batch_3: {message}"):
            D.cifar10(tmp_path)
    # a pixel changed in place: pickles have no checksum, so only a SHA256SUMS beside them finds it
    batch.write_bytes(good)
    at = next(i for i in range(len(good) // 2, len(good)) if good[i] < 0x7F)  # an ASCII byte of the pixels
    _flip(batch, at)
    changed = D.cifar10(tmp_path)
    assert (changed.train_x != ref.train_x).sum() == 1
    batch.write_bytes(good)
    sums = "".join(f"{_sha(folder / n)}  {n}\n" for n in sorted(os.listdir(folder)))
    (folder / "SHA256SUMS").write_text(sums)
    np.testing.assert_array_equal(D.cifar10(tmp_path).train_x, ref.train_x)
    _flip(batch, at)
    with pytest.raises(D.DataError, match=r"data_batch_3: SHA-256 .* listed for it in .*SHA256SUMS:3"):
        D.cifar10(tmp_path)


# ----------------------------------------------------------------------------------- integrity: text


def test_wikitext2_changed_character_in_a_real_copy(data_root, tmp_path):
    ref = D.wikitext2(data_root)
    folder = _copy_set(data_root, tmp_path, "wikitext-2")
    copy = D.wikitext2(tmp_path)
    assert copy.vocab == ref.vocab
    np.testing.assert_array_equal(copy.test, ref.test)
    test = folder / "test.txt"
    text = test.read_bytes()
    at = text.index(b"Robert")
    test.write_bytes(text[:at] + b"Rubert" + text[at + 6:])
    listed = _sha(data_root / "wikitext-2" / "test.txt")[:12]
    with pytest.raises(D.DataError, match=rf"test\.txt: SHA-256 {_sha(test)[:12]}\.\.\. differs from {listed}"
                                          rf"\.\.\. listed for it in .*SHA256SUMS:3"):
        D.wikitext2(tmp_path, limit=2)
    # without the digest list only the structure is checked: the changed word loads (documented)
    (folder / "SHA256SUMS").unlink()
    assert D.wikitext2(tmp_path).unknown == 1
    test.write_bytes(text[:at] + b"\x00" * 6 + text[at + 6:])
    with pytest.raises(D.DataError, match=rf"test\.txt: NUL byte at byte {at}"):
        D.wikitext2(tmp_path, limit=2)


def test_tiny_shakespeare_changed_character_in_a_real_copy(data_root, tmp_path):
    folder = _copy_set(data_root, tmp_path, "tiny-shakespeare")
    ref = D.tiny_shakespeare(data_root)
    copy = D.tiny_shakespeare(tmp_path)
    np.testing.assert_array_equal(np.concatenate([copy.train, copy.valid, copy.test]),
                                  np.concatenate([ref.train, ref.valid, ref.test]))
    path = folder / "input.txt"
    text = path.read_bytes()
    path.write_bytes(text[:500] + (b"X" if text[500:501] != b"X" else b"Y") + text[501:])
    with pytest.raises(D.DataError, match=r"input\.txt: SHA-256 .* differs from 86c4e6aa9db7\.\.\. listed"):
        D.tiny_shakespeare(tmp_path, limit=10)
    digest = _sha(data_root / "tiny-shakespeare" / "input.txt")
    (folder / "SHA256SUMS").write_text(f"{digest} input.txt\n")  # one space: not what sha256sum writes
    with pytest.raises(D.DataError, match=r"SHA256SUMS:1: malformed line"):
        D.tiny_shakespeare(tmp_path)
