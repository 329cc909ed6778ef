"""Every test runs in some tox env, and none runs twice by accident.

The tox envs select tests in different ways (``DEQCORE_TEST_BACKENDS``, ``-m``, paths), and a test
that none of them selects never runs while every env passes. This check reads ``tox.ini`` (as
tox reads it: ``env_list``, each env's ``set_env`` and ``commands``, falling back to
``[testenv]``), collects each ``pytest`` command of each env with that env's settings
(``pytest --collect-only -q``, nothing runs), and compares the union with the collection of
everything: ``tests/`` (pyproject's ``testpaths``) and each ``plugins/*/tests``, with every backend
selected. A test in no env fails, and so does a test selected twice, except the deliberate
repeats listed in :data:`REPEATS`.

It needs torch and JAX installed (it collects with both selected), so it runs in the ``both``
env; it only collects, in a few seconds.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

pytestmark = [pytest.mark.backend("torch"), pytest.mark.backend("jax")]

ROOT = Path(__file__).resolve().parents[1]
TOX_INI = ROOT / "tox.ini"
ALL_BACKENDS = "torch,jax"

#: Tests that deliberately run in more than one env, by file, and why.
REPEATS = {
    "tests/test_import.py": "again in `both`: with both frameworks installed, importing deqcore imports "
                            "neither",
    "tests/test_registry.py": "again in `both`: the registry and plugin loading with both frameworks "
                              "installed",
}
#: A test collected under the same id by the torch and the jax env depends on no backend (a
#: backend-specific test is deselected in one of them, and one using the ``h`` fixture gets the
#: backend in its id). It runs in both on purpose: each env installs only its own framework, so
#: the code it tests must work without the other one.
BACKEND_FREE_ENVS = {"torch", "jax"}


@dataclass(frozen=True)
class Selection:
    """One ``pytest`` command of one tox env: its arguments and ``DEQCORE_TEST_BACKENDS``."""

    env: str
    index: int
    args: tuple[str, ...]
    backends: str | None

    def __str__(self) -> str:
        return f"[testenv:{self.env}] command {self.index + 1} (pytest {' '.join(self.args)})"


# ------------------------------------------------------------------------------------------------
# reading tox.ini

_BRACES = re.compile(r"\{([^{}]*)\}")


def _substitute(value: str, cfg: configparser.ConfigParser, section: str) -> str:
    """tox's substitutions, innermost first: ``{posargs}`` (empty), ``{toxinidir}``, ``{/}``,
    ``{env:NAME:default}``, ``{[section]key}``. Any other is an error, so a new one in tox.ini
    cannot make this check read the file wrongly."""

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner == "posargs":
            return ""
        if inner == "toxinidir":
            return str(ROOT)
        if inner == "/":
            return os.sep
        if inner.startswith("env:"):
            name, _, default = inner[4:].partition(":")
            return os.environ.get(name, default)
        ref = re.fullmatch(r"\[([^\]]+)\]([\w-]+)", inner)
        if ref is not None:
            return _substitute(cfg.get(ref.group(1), ref.group(2)), cfg, ref.group(1))
        raise ValueError(f"{TOX_INI}: [{section}] uses the substitution {{{inner}}}, which "
                         f"tests/test_selection.py does not know; teach it _substitute")

    while True:
        new = _BRACES.sub(replace, value)
        if new == value:
            return new
        value = new


def _setting(cfg: configparser.ConfigParser, env: str, key: str) -> tuple[str, str]:
    """An env's setting, falling back to ``[testenv]`` as tox does: (section, raw value)."""
    for section in (f"testenv:{env}", "testenv"):
        if cfg.has_option(section, key):
            return section, cfg.get(section, key)
    return "testenv", ""


def tox_selections(ini: Path) -> list[Selection]:
    """The pytest commands of every env of ``env_list`` in ``ini``."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ini)
    envs = [e.strip() for e in re.split(r"[,\n]", cfg.get("tox", "env_list")) if e.strip()]
    selections = []
    for env in envs:
        section, raw = _setting(cfg, env, "set_env")
        set_env = {}
        for line in _substitute(raw, cfg, section).splitlines():
            if line.strip():
                key, _, value = line.partition("=")
                set_env[key.strip()] = value.strip()
        section, raw = _setting(cfg, env, "commands")
        commands = [line.strip().removeprefix("-").strip() for line in raw.splitlines() if line.strip()]
        pytest_commands = [shlex.split(_substitute(c, cfg, section)) for c in commands]
        pytest_commands = [words[1:] for words in pytest_commands if words and words[0] == "pytest"]
        selections += [Selection(env, i, tuple(args), set_env.get("DEQCORE_TEST_BACKENDS"))
                       for i, args in enumerate(pytest_commands)]
    return selections


# ------------------------------------------------------------------------------------------------
# collecting


def collect(args: Iterable[str], backends: str | None) -> frozenset[str]:
    """Node ids (relative to the repository root) that ``pytest args`` selects with
    ``DEQCORE_TEST_BACKENDS=backends`` (unset for None, as tox passes it only through set_env)."""
    env = {k: v for k, v in os.environ.items() if k != "DEQCORE_TEST_BACKENDS"}
    if backends is not None:
        env["DEQCORE_TEST_BACKENDS"] = backends
    # the console script, as tox runs it: `python -m pytest` would put the source tree on sys.path
    script = shutil.which("pytest", path=str(Path(sys.executable).parent))
    command = [*([script] if script else [sys.executable, "-m", "pytest"]), "--collect-only", "-q",
               "-p", "no:cacheprovider", "--rootdir", str(ROOT), *args]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise AssertionError(f"collecting failed ({run.returncode}): DEQCORE_TEST_BACKENDS={backends} "
                             f"{' '.join(command)}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
    ids = run.stdout.split("\n\n")[0].splitlines()
    assert ids and all("::" in line for line in ids), run.stdout[-4000:]
    return frozenset(ids)


def reference_paths() -> list[tuple[str, ...]]:
    """What "everything" is: pyproject's testpaths, and each plugin distribution's tests."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    testpaths = pyproject["tool"]["pytest"]["ini_options"]["testpaths"]
    plugins = sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("plugins/*/tests") if p.is_dir())
    return [tuple(testpaths), *[(p,) for p in plugins]]


class Collections:
    """Collections run in parallel, each once per (arguments, backends)."""

    def __init__(self) -> None:
        self._done: dict[tuple[tuple[str, ...], str | None], frozenset[str]] = {}

    def run(self, jobs: list[tuple[tuple[str, ...], str | None]]) -> list[frozenset[str]]:
        todo = [job for job in dict.fromkeys(jobs) if job not in self._done]
        with ThreadPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
            for job, ids in zip(todo, pool.map(lambda job: collect(*job), todo), strict=True):
                self._done[job] = ids
        return [self._done[job] for job in jobs]

    def selected(self, selections: list[Selection]) -> dict[Selection, frozenset[str]]:
        return dict(zip(selections, self.run([(s.args, s.backends) for s in selections]), strict=True))

    def everything(self) -> frozenset[str]:
        return frozenset().union(*self.run([(paths, ALL_BACKENDS) for paths in reference_paths()]))


def uncovered(everything: frozenset[str], selected: dict[Selection, frozenset[str]]) -> list[str]:
    return sorted(everything - frozenset().union(*selected.values()))


def repeated(selected: dict[Selection, frozenset[str]]) -> dict[str, list[Selection]]:
    """Tests selected more than once, except the deliberate repeats."""
    by_test: dict[str, list[Selection]] = {}
    for selection, ids in selected.items():
        for test in ids:
            by_test.setdefault(test, []).append(selection)
    unexpected = {}
    for test, where in by_test.items():
        envs = sorted(s.env for s in where)
        if len(envs) < 2 or envs == sorted(BACKEND_FREE_ENVS):
            continue
        if test.split("::")[0] in REPEATS and len(set(envs)) == len(envs):  # once per env
            continue
        unexpected[test] = where
    return unexpected


# ------------------------------------------------------------------------------------------------
# the checks


@pytest.fixture(scope="module")
def collections() -> Collections:
    return Collections()


@pytest.fixture(scope="module")
def selected(collections: Collections) -> dict[Selection, frozenset[str]]:
    return collections.selected(tox_selections(TOX_INI))


def test_tox_ini_is_read_with_every_pytest_command(selected):
    envs = {s.env for s in selected}
    assert {"torch", "jax", "both", "plugin"} <= envs
    for selection, ids in selected.items():
        assert ids, f"{selection} collects nothing"
        assert "{" not in " ".join(selection.args), selection
    backends = {s.env: s.backends for s in selected}
    assert backends["torch"] == "torch" and backends["jax"] == "jax" and backends["both"] == ALL_BACKENDS


def test_every_collected_test_runs_in_some_tox_env(collections, selected):
    everything = collections.everything()
    assert any(t.startswith("tests/") for t in everything)
    assert any(t.startswith("plugins/") for t in everything)
    missing = uncovered(everything, selected)
    assert not missing, (
        f"{len(missing)} test(s) run in no tox env (every env deselects them):\n  " + "\n  ".join(missing)
        + "\nGive each the marker its env selects (tests needing both backends are `equivalence`, "
          "see tests/conftest.py) or select it in tox.ini.")


def test_no_test_runs_in_two_tox_envs_by_accident(selected):
    twice = repeated(selected)
    listing = "\n  ".join(f"{t}: {', '.join(str(s) for s in where)}" for t, where in sorted(twice.items()))
    assert not twice, (f"{len(twice)} test(s) are selected by more than one tox command:\n  {listing}\n"
                       "Deselect them in all but one, or add their file to REPEATS with the reason.")


def test_the_check_finds_tests_that_no_env_selects(collections, selected, tmp_path):
    """The check itself: with the `both` env reduced to its import and registry command, the tests
    that only `-m equivalence` selected are reported, and exactly those."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(TOX_INI)
    commands = [c for c in cfg.get("testenv:both", "commands").splitlines() if c.strip()]
    cfg.set("testenv:both", "commands", "\n" + "\n".join(c for c in commands if "-m equivalence" not in c))
    reduced = tmp_path / "tox.ini"
    with reduced.open("w") as fh:
        cfg.write(fh)
    crippled = collections.selected(tox_selections(reduced))
    equivalence = next(ids for s, ids in selected.items() if s.env == "both" and "equivalence" in s.args)
    others = frozenset().union(*(ids for s, ids in crippled.items()))
    missing = uncovered(collections.everything(), crippled)
    assert missing == sorted(equivalence - others)
    assert "tests/test_selection.py::test_every_collected_test_runs_in_some_tox_env" in missing
    assert any(t.startswith("tests/test_equivalence.py::") for t in missing)
    # and a test selected twice is reported: the equivalence tests once more, by a second env
    twice = repeated({**selected, Selection("again", 0, ("-m", "equivalence"), ALL_BACKENDS): equivalence})
    assert sorted(twice) == sorted(t for t in equivalence if t.split("::")[0] not in REPEATS)
