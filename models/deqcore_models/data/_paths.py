from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: Environment variable naming the data folder when no ``--data`` flag is given.
DATA_ENV = "DEQCORE_DATA"


class DataError(RuntimeError):
    """A data file is missing, corrupted (its digest, checksum or size is wrong) or not in the
    expected format. The message names the file, what is wrong and the fix; deqcore never downloads
    data."""


def data_dir(flag: str | os.PathLike[str] | None = None) -> Path:
    """The data folder: ``flag`` if given, else ``$DEQCORE_DATA``.

    Raises :class:`DataError` when neither is set or the folder does not exist. There is no
    default: a run must say where its data lives (the machines have no internet, and a silent
    fallback path hides a misconfigured job).
    """
    if flag is not None and str(flag).strip():
        path, origin = Path(flag), "--data"
    else:
        env = os.environ.get(DATA_ENV, "").strip()
        if not env:
            raise DataError(
                f"no data folder given: pass --data DIR or set the environment variable {DATA_ENV} "
                f"to the folder that holds fashion-mnist/, cifar-10/, wikitext-2/ and tiny-shakespeare/"
            )
        path, origin = Path(env), f"${DATA_ENV}"
    if not path.is_dir():
        raise DataError(f"data folder {path} (from {origin}) does not exist or is not a folder")
    return path


def require_file(path: Path, expected: str) -> Path:
    """``path`` if it is a file; else a :class:`DataError` naming it and the expected format."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}\n  expected {expected}.\n  deqcore never "
                        f"downloads data: put the file there or point --data / ${DATA_ENV} elsewhere.")
    return path


def check_limit(limit: object, name: str = "limit") -> int | None:
    """``limit`` (keep the first ``limit`` items of each split) if it is None or a positive int."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int or None (all items), got {type(limit).__name__}")
    if limit < 1:
        raise ValueError(f"{name} must be a positive int or None (all items), got {limit}")
    return int(limit)
