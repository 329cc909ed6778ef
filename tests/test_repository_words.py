"""The repository speaks to its users: no references to how its development was organised.

Code, docs, comments, benchmark files and test names are read by users, who cannot follow an
issue number from another tracker or a note about the state of some task. Every text file of the
repository is scanned for the patterns below; a third-party project's issue *link* (a URL) may
stay, and "issue" as an English word is fine.
"""

from __future__ import annotations

import re
from pathlib import Path

from repository_files import ROOT, source_files

DENIED = {
    "an issue number": re.compile(r"(?<![/\w])issues?\s*(?:#\s*)?\d+", re.I),
    "a task tracker": re.compile(r"\b(?:steering|tickets?|workflows?)\b", re.I),
    "a working session": re.compile(r"\bsessions?\b(?!\"\))", re.I),
    "a task marker": re.compile(r"\b(?:TODO|FIXME|XXX)\b"),
}
#: This file names the patterns it looks for.
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()


def _hits(text: str) -> list[tuple[int, str, str]]:
    found = []
    for what, pattern in DENIED.items():
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((line, what, m.group(0)))
    return found


def test_no_workflow_words_in_the_repository():
    wrong = []
    scanned = 0
    for rel in source_files():
        if rel == SELF:
            continue
        try:
            text = (ROOT / rel).read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, checkpoints
            continue
        scanned += 1
        wrong += [f"{rel}:{line}: {what}: {match!r}" for line, what, match in _hits(text)]
    assert scanned > 100  # the scan saw the repository, not an empty folder
    assert not wrong, "words for developers, not users:\n" + "\n".join(wrong)


def test_the_patterns_catch_what_they_are_for():
    caught = {what for _, what, _ in _hits(
        "Done in issue #4, in progress (Issue 4's goal), issues 12, the steering repo, a ticket, "
        "this session, TODO: later, see workflow")}
    assert caught == set(DENIED)
    assert not _hits('An issue users meet; @pytest.fixture(scope="session"); todo = []; '
                     "https://github.com/google/jax/issues/1234; the issue is the 2 statements")
