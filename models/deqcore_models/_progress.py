from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A one-line progress bar on a terminal; periodic plain lines otherwise (CI logs)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, every: int = 20) -> None:
        self.total, self.label = total, label
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.every = every
        self.start = time.perf_counter()
        self.count = 0

    def update(self, count: int, fields: dict[str, str]) -> None:
        self.count = count
        elapsed = time.perf_counter() - self.start
        rate = count / elapsed if elapsed > 0 else 0.0
        info = "  ".join(f"{k} {v}" for k, v in fields.items())
        if self.tty:
            filled = int(24 * count / max(self.total, 1))
            bar = "#" * filled + "." * (24 - filled)
            self.stream.write(f"\r{self.label} [{bar}] {count}/{self.total}  {info}  {rate:.2f} it/s ")
            self.stream.flush()
        elif count % self.every == 0 or count == self.total:
            self.stream.write(f"{self.label} {count}/{self.total}  {info}  {rate:.2f} it/s\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
