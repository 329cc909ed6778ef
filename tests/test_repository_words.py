"""The repository speaks to its users: no references to how its development was organised.

Code, docs, comments, benchmark files and test names are read by users, who cannot follow an
issue number from another tracker or a note about the state of some task. Every text file of the
repository is scanned for the patterns below; a third-party project's issue *link* (a URL) may
stay, and "issue" as an English word is fine.
"""

from __future__ import annotations

import re

from repository_files import ROOT, source_files

# The patterns are spelled with character classes ([e], [o], ...) so that this file passes its
# own scan: it is read like every other file.
DENIED = {
    "an issue number": re.compile(r"(?<![/\w])issues?\s*(?:#\s*)?\d+", re.I),
    "a task tracker": re.compile(r"\b(?:st[e]ering|tick[e]ts?|workfl[o]ws?)\b", re.I),
    "a work period": re.compile(r"\bsess[i]ons?\b(?!\"\))", re.I),
    "a task marker": re.compile(r"\b(?:T[O]DO|F[I]XME|X[X]X)\b"),
}


def _spell(*parts: str) -> str:
    """Join ``parts``: the examples below name the denied words without writing them."""
    return "".join(parts)


def _hits(text: str) -> list[tuple[int, str, str]]:
    found = []
    for what, pattern in DENIED.items():
        for m in pattern.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.append((line, what, m.group(0)))
    return found


def test_every_file_speaks_to_users():
    wrong = []
    scanned = 0
    for rel in source_files():
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
        _spell("Done in iss", "ue #4, in progress (Iss", "ue 4's goal), iss", "ues 12, ",
               "the st", "eering repo, a tic", "ket, this sess", "ion, TO", "DO: later, see work", "flow"))}
    assert caught == set(DENIED)
    assert not _hits('An issue users meet; @pytest.fixture(scope="session"); todo = []; '
                     "https://github.com/google/jax/issues/1234; the issue is the 2 statements")
