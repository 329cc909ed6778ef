"""Reading and writing result files: CSV, strict JSON and PNG plots (matplotlib is optional).

Every writer is atomic (a reader never sees half a file), and every plot goes through
:func:`pyplot`, the one place that decides what happens without matplotlib.
"""

from __future__ import annotations

import csv
import io
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from deqcore.internal import dumps_json, write_atomic, write_text

#: What to install for the plots.
PLOTS_EXTRA = "pip install 'deqcore[demo]'"


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings ([] when there is no file)."""
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """``records`` (dicts with the first one's keys) as CSV with a header, written atomically."""
    names = list(records[0])
    write_text(path, csv_text([names, *([row.get(k) for k in names] for row in records)]))


def save_json(path: Path, data: Any) -> None:
    """``data`` as strict JSON (non-finite numbers as ``null``), written atomically."""
    write_text(path, dumps_json(data, indent=2))


def pyplot(warn: str | None = None) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None without matplotlib (then
    ``warn``, when given, says what was not written and how to get it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if warn is not None:
            warnings.warn(f"matplotlib is not installed: {warn} ({PLOTS_EXTRA})", stacklevel=3)
        return None
    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Write ``fig`` as PNG atomically, then close it (also when the write fails)."""
    import matplotlib.pyplot as plt

    try:
        write_atomic(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    finally:
        plt.close(fig)
