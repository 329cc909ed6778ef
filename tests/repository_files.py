"""The repository's files, as a fresh clone would have them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IGNORED = {".git", ".venv", ".tox", "build", "dist", "site", "__pycache__", ".pytest_cache", ".ruff_cache",
           ".mypy_cache", ".hypothesis"}


def source_files() -> list[str]:
    """Paths (relative to the root) of the working tree as a fresh clone would have it: tracked
    plus untracked, not ignored. Without git, every file outside the usual build and cache folders."""
    if shutil.which("git") and (ROOT / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True).stdout
        return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    return [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
            if p.is_file() and not IGNORED & set(p.relative_to(ROOT).parts)
            and not any(part.endswith(".egg-info") for part in p.parts)]
