"""Data files read whole and verified: ``SHA256SUMS`` digests, gzip and zip checksums, exact layouts.

Every loader reads its files through :func:`read_data_file`, so no data file is used before all of
its bytes were read. A file listed in the ``SHA256SUMS`` of its own folder (the format ``sha256sum``
writes, names relative to that folder) must have that digest; the digest is computed while the
bytes are read, and a file already verified in this process (same path, inode, size, mtime and
ctime, same listed digest) is not hashed again. The container formats are checked whole whatever
the digest says: :func:`gunzip` checks every gzip member's CRC-32 and length and refuses bytes
after the last member, :func:`read_npz` checks every zip member's CRC-32 and that the archive has no
bytes before, between or after its records.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ._paths import DataError, require_file

#: Name of the digest list beside a data set's files.
SUMS_NAME = "SHA256SUMS"

_CHUNK = 1 << 20
_GNU_LINE = re.compile(r"(?P<digest>[0-9a-fA-F]{64}) [ *](?P<name>.+)")
_TAG_LINE = re.compile(r"SHA256 \((?P<name>.+)\) = (?P<digest>[0-9a-fA-F]{64})")

_StatKey = tuple[int, int, int, int, int]
_SUMS_CACHE: dict[Path, tuple[_StatKey, dict[str, tuple[str, int]]]] = {}
_VERIFIED: set[tuple[str, _StatKey, str]] = set()


def _stat_key(st: os.stat_result) -> _StatKey:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _restore_hint(path: Path) -> str:
    return (f"the file is damaged, incomplete or not the expected one: copy {path.name} again from the "
            f"original release")


def _unescape(name: str) -> str:
    # sha256sum writes names holding a backslash or newline with a leading backslash and escapes
    out, i = [], 0
    while i < len(name):
        if name[i] == "\\" and i + 1 < len(name) and name[i + 1] in "\\n":
            out.append("\n" if name[i + 1] == "n" else "\\")
            i += 2
        else:
            out.append(name[i])
            i += 1
    return "".join(out)


def read_sha256sums(path: Path) -> dict[str, tuple[str, int]]:
    """Parse a ``SHA256SUMS`` file: ``{name: (lowercase hex digest, line number)}``.

    Accepts the lines ``sha256sum`` writes (``<64 hex>  name``, ``<64 hex> *name``, escaped names
    starting with ``\\``) and its ``--tag`` form ``SHA256 (name) = <64 hex>``; blank lines and
    ``#`` comments are skipped. Names are normalised (``./a`` is ``a``). Any other line, or a name
    listed twice with different digests, raises :class:`DataError` naming the file and line.
    """
    try:
        with open(path, "rb") as fh:
            key = _stat_key(os.fstat(fh.fileno()))
            cached = _SUMS_CACHE.get(path)
            if cached is not None and cached[0] == key:
                return cached[1]
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the digest list ({type(exc).__name__}: {exc})") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); expected the lines sha256sum "
                        f"writes: '<64 hex digits>  <file name>'") from exc
    table: dict[str, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        escaped = line.startswith("\\")
        match = _GNU_LINE.fullmatch(line[1:] if escaped else line) or _TAG_LINE.fullmatch(line)
        if match is None:
            raise DataError(f"{path}:{number}: malformed line {line!r}; expected '<64 hex digits>  <file "
                            f"name>' as sha256sum writes it. Fix or remove the line, or write the file "
                            f"again: cd {path.parent} && sha256sum FILES > {SUMS_NAME}")
        name = posixpath.normpath(_unescape(match["name"]) if escaped else match["name"])
        digest = match["digest"].lower()
        if name in table and table[name][0] != digest:
            raise DataError(f"{path}:{number}: {name} is listed again with another digest (first on line "
                            f"{table[name][1]}); keep one line per file")
        table.setdefault(name, (digest, number))
    _SUMS_CACHE[path] = (key, table)
    return table


def _listed_digest(path: Path) -> tuple[Path, str, int] | None:
    sums = path.parent / SUMS_NAME
    if not sums.exists():
        return None
    if not sums.is_file():
        raise DataError(f"{sums}: not a file; the digest list beside {path.name} must be a {SUMS_NAME} file")
    entry = read_sha256sums(sums).get(path.name)
    return None if entry is None else (sums, *entry)


def read_data_file(path: Path, expected: str) -> bytearray:
    """All bytes of the data file ``path``, checked against the ``SHA256SUMS`` beside it if it lists it.

    Raises :class:`DataError` when the file is missing (naming ``expected``, the format), cannot be
    read, changes size while read, or its SHA-256 differs from the listed one (naming both). The
    digest is computed chunk by chunk as the bytes arrive and remembered per (path, inode, size,
    mtime, ctime), so a second load in the same process does not hash the file again.
    """
    require_file(path, expected)
    listed = _listed_digest(path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (str(path.resolve()), _stat_key(st), listed[1] if listed else "")
            hasher = hashlib.sha256() if listed is not None and key not in _VERIFIED else None
            buf = bytearray(st.st_size)
            view = memoryview(buf)
            pos = 0
            while pos < len(buf):
                n = fh.readinto(view[pos: pos + _CHUNK])
                if not n:
                    break
                if hasher is not None:
                    hasher.update(view[pos: pos + n])
                pos += n
            grown = bool(fh.read(1))
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if pos != len(buf) or grown:
        raise DataError(f"{path}: the file changed size while it was read ({st.st_size} bytes when "
                        f"opened); load it again once nothing writes to it")
    if hasher is not None and listed is not None:
        sums, digest, line = listed
        actual = hasher.hexdigest()
        if actual != digest:
            raise DataError(f"{path}: SHA-256 {actual[:12]}... differs from {digest[:12]}... listed for it "
                            f"in {sums}:{line}; {_restore_hint(path)}. If you changed it on purpose, "
                            f"update its line: cd {path.parent} && sha256sum {path.name}")
        _VERIFIED.add(key)
    return buf


# ------------------------------------------------------------------------------------------ gzip

_ZLIB_FAULTS = {
    "incorrect header check": "not gzip data (no gzip header)",
    "unknown compression method": "not gzip data (unknown compression method)",
    "incorrect data check": "the CRC-32 in the gzip trailer does not match the decompressed data",
    "incorrect length check": "the length in the gzip trailer does not match the decompressed data",
}


def gunzip(path: Path, data: bytes | bytearray) -> bytes:
    """Decompress the gzip file ``path`` (its bytes ``data``) whole, checking every member.

    Each member's deflate stream, CRC-32 and length trailer are checked (concatenated members are
    valid gzip); a stream that ends early or any byte after the last member raises
    :class:`DataError`.
    """
    parts: list[bytes] = []
    rest: bytes | bytearray = data
    offset = 0
    while True:
        inflater = zlib.decompressobj(wbits=31)
        try:
            parts.append(inflater.decompress(rest))
        except zlib.error as exc:
            detail = str(exc).split(": ", 1)[-1]
            what = _ZLIB_FAULTS.get(detail, f"the deflate stream is corrupted ({detail})")
            raise DataError(f"{path}: gzip member at byte {offset}: {what} (zlib: {exc}); "
                            f"{_restore_hint(path)}") from exc
        if not inflater.eof:
            raise DataError(f"{path}: the gzip data ends early: the member at byte {offset} has no end "
                            f"(the file is truncated); {_restore_hint(path)}")
        tail = inflater.unused_data
        if not tail:
            break
        offset = len(data) - len(tail)
        if tail[:2] != b"\x1f\x8b":
            raise DataError(f"{path}: {len(tail)} bytes after the end of the gzip data (from byte {offset}); "
                            f"{_restore_hint(path)}")
        rest = tail
    return parts[0] if len(parts) == 1 else b"".join(parts)


# ------------------------------------------------------------------------------------------- zip

_LOCAL, _CENTRAL_END, _ZIP64_END, _ZIP64_LOCATOR = b"PK\x03\x04", b"PK\x05\x06", b"PK\x06\x06", b"PK\x06\x07"


def _u(data: bytes | bytearray, at: int, size: int) -> int:
    return int.from_bytes(data[at: at + size], "little")


def _zip_layout_fault(data: bytes | bytearray, zf: zipfile.ZipFile) -> str | None:
    """Why the records of the zip archive ``data`` do not tile it exactly, or None."""
    end = data.rfind(_CENTRAL_END, max(0, len(data) - 22 - 0xFFFF))
    if end < 0:
        return "no end-of-central-directory record"
    stop = end + 22 + _u(data, end + 20, 2)
    if stop != len(data):
        if stop > len(data):
            return "the zip end record declares a comment past the end of the file"
        return f"{len(data) - stop} bytes after the end of the zip archive (from byte {stop})"
    pos = 0
    for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
        if info.header_offset != pos:
            return (f"{info.header_offset - pos} unaccounted bytes at byte {pos}, before member "
                    f"{info.filename}" if info.header_offset > pos else f"member {info.filename} overlaps "
                    f"the one before it")
        if data[pos: pos + 4] != _LOCAL:
            return f"member {info.filename} has no local header at byte {pos}"
        name_len, extra_len = _u(data, pos + 26, 2), _u(data, pos + 28, 2)
        extra = data[pos + 30 + name_len: pos + 30 + name_len + extra_len]
        pos += 30 + name_len + extra_len + info.compress_size
        if info.flag_bits & 0x08:  # a data descriptor follows the data
            zip64 = any(_u(extra, i, 2) == 1 for i in _extra_ids(extra))
            pos += (4 if data[pos: pos + 4] == b"PK\x07\x08" else 0) + (20 if zip64 else 12)
    if pos != zf.start_dir:
        return f"{zf.start_dir - pos} unaccounted bytes at byte {pos}, before the central directory"
    if data[end - 20: end - 16] == _ZIP64_LOCATOR:
        record = _u(data, end - 12, 8)
        if data[record: record + 4] != _ZIP64_END or record + 12 + _u(data, record + 4, 8) != end - 20:
            return "the zip64 end records are not where the locator says"
        directory_end = record
        directory_size = _u(data, record + 40, 8)
    else:
        directory_end, directory_size = end, _u(data, end + 12, 4)
    if zf.start_dir + directory_size != directory_end:
        gap = directory_end - zf.start_dir - directory_size
        return f"{gap} unaccounted bytes after the central directory"
    return None


def _extra_ids(extra: bytes | bytearray) -> list[int]:
    at, out = 0, []
    while at + 4 <= len(extra):
        out.append(at)
        at += 4 + _u(extra, at + 2, 2)
    return out


def read_npz(path: Path, data: bytes | bytearray, expected: str) -> dict[str, np.ndarray]:
    """Every array of the npz file ``path`` (its bytes ``data``), each member read whole.

    Checks the CRC-32 of every member (also those the caller does not use), that each member is
    one ``.npy`` array (no pickled objects) with no bytes after it, and that the archive holds
    nothing besides its records. Raises :class:`DataError` naming the file, the member and
    ``expected`` otherwise.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable zip/npz archive ({type(exc).__name__}: {exc}); "
                        f"{_restore_hint(path)}; expected {expected}") from exc
    with zf:
        fault = _zip_layout_fault(data, zf)
        if fault is not None:
            raise DataError(f"{path}: {fault}; {_restore_hint(path)}")
        arrays: dict[str, np.ndarray] = {}
        for info in zf.infolist():
            name = info.filename
            if not name.endswith(".npy") or name[:-4] in arrays:
                what = "listed twice" if name[:-4] in arrays else "not a .npy array"
                raise DataError(f"{path}: member {name!r} is {what}; expected {expected}")
            try:
                raw = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError, RuntimeError,
                    NotImplementedError) as exc:
                raise DataError(f"{path}: member {name} is corrupted ({type(exc).__name__}: {exc}); "
                                f"{_restore_hint(path)}") from exc
            fh = io.BytesIO(raw)
            try:
                array = np.lib.format.read_array(fh, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise DataError(f"{path}: member {name} is not a valid .npy array ({type(exc).__name__}: "
                                f"{exc}); expected {expected}") from exc
            if fh.tell() != len(raw):
                raise DataError(f"{path}: member {name} has {len(raw) - fh.tell()} bytes after its "
                                f"{array.dtype} {array.shape} array; {_restore_hint(path)}")
            arrays[name[:-4]] = array
    return arrays
