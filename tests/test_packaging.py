"""What ``pip install deqcore`` gets: the wheel's files and metadata, and the torch pin.

The wheel is built (offline) from a copy of the working tree, so the build leaves no ``build/``
or ``*.egg-info`` behind in the repository and stale build output cannot leak into the wheel.
"""

from __future__ import annotations

import configparser
import email.parser
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from repository_files import source_files

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"deqcore", "deqcore_torch", "deqcore_jax", "deqcore_models"}
# wheel path prefix -> source directory of that package
PACKAGE_SOURCES = {
    "deqcore": ROOT / "deqcore",
    "deqcore_torch": ROOT / "backends" / "deqcore_torch",
    "deqcore_jax": ROOT / "backends" / "deqcore_jax",
    "deqcore_models": ROOT / "models" / "deqcore_models",
}
TORCH_PIN = "==2.13.0"
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--wheel", "-o", str(out), str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(4, "--no-isolation")  # fast, and needs no package index at all
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    (whl,) = out.glob("*.whl")
    return whl


def _names(whl: Path) -> list[str]:
    with zipfile.ZipFile(whl) as zf:
        return zf.namelist()


def _dist_info(whl: Path) -> str:
    (info,) = {n.split("/")[0] for n in _names(whl) if n.split("/")[0].endswith(".dist-info")}
    return info


def _metadata(whl: Path):
    with zipfile.ZipFile(whl) as zf:
        return email.parser.Parser().parsestr(zf.read(f"{_dist_info(whl)}/METADATA").decode())


@pytest.mark.slow
def test_wheel_has_exactly_the_three_packages(wheel):
    names = [n for n in _names(wheel) if not n.startswith(_dist_info(wheel) + "/")]
    top = {n.split("/")[0] for n in names}
    assert top == TOP_LEVEL, f"unexpected top-level entries: {sorted(top ^ TOP_LEVEL)}"
    for stray in ("backends", "models", "plugins", "tests", "benchmarks", "docs", "scripts"):
        assert not any(n.split("/")[0] == stray for n in names)
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    with zipfile.ZipFile(wheel) as zf:
        top_level = zf.read(f"{_dist_info(wheel)}/top_level.txt").decode().split()
    assert set(top_level) == TOP_LEVEL


@pytest.mark.slow
def test_wheel_has_every_source_module(wheel):
    names = set(_names(wheel))
    for must in ("deqcore/__init__.py", "deqcore/_registry.py", "deqcore/_hookspecs.py",
                 "deqcore/solvers/_anderson.py", "deqcore_torch/__init__.py", "deqcore_torch/_backend.py",
                 "deqcore_jax/__init__.py", "deqcore_jax/_backend.py", "deqcore_models/data/_images.py"):
        assert must in names
    # every module of the source tree ships, subpackages included (a new subpackage left out of
    # pyproject's package list would import in the repo but not after `pip install`)
    sources = set(source_files())
    missing = []
    for prefix, directory in PACKAGE_SOURCES.items():
        for path in directory.rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if rel in sources and f"{prefix}/{path.relative_to(directory).as_posix()}" not in names:
                missing.append(rel)
    assert not missing, f"source modules missing from the wheel: {missing}"


@pytest.mark.slow
def test_wheel_metadata_pins_torch_in_the_torch_extra(wheel):
    meta = _metadata(wheel)
    assert meta["Name"] == "deqcore"
    assert {"torch", "jax", "equinox", "flax"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    assert 'torch==2.13.0; extra == "torch"' in requires
    torch_reqs = [Requirement(r) for r in requires if Requirement(r).name == "torch"]
    assert len(torch_reqs) == 1
    (req,) = torch_reqs
    assert str(req.specifier) == TORCH_PIN
    assert req.marker is not None
    assert req.marker.evaluate({"extra": "torch"})
    assert not req.marker.evaluate({"extra": ""}) and not req.marker.evaluate({"extra": "jax"})
    # the base install needs neither framework
    base = [Requirement(r) for r in requires if Requirement(r).marker is None]
    assert {"pluggy"} <= {r.name for r in base}
    assert not {"torch", "jax", "jaxlib"} & {r.name for r in base}


@pytest.mark.slow
def test_wheel_contents_import_and_register(wheel, tmp_path):
    """Unpacked alone (as pip would install it), the wheel's deqcore finds its backend plugins."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    script = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import deqcore, deqcore_torch, deqcore_jax; "
        "print(json.dumps({'files': [m.__file__ for m in (deqcore, deqcore_torch, deqcore_jax)], "
        "'available': deqcore.available(), 'plugins': deqcore.registry().plugins()}))"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(site)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for file in out["files"]:
        assert Path(file).resolve().is_relative_to(site.resolve()), file
    assert {"torch", "jax"} <= set(out["available"]["backends"])
    assert {"anderson", "broyden", "fixed_point"} <= set(out["available"]["solvers"])
    assert out["plugins"][:3] == ["deqcore", "deqcore_torch", "deqcore_jax"]


# ------------------------------------------------------------------------------------------------
# torch is pinned exactly everywhere: any other specifier pulls a CUDA build from the index

_TORCH_TOKEN = re.compile(r"(?<![\w.\[-])torch(?![\w.\]-])")


def _torch_requirements(lines, where: str) -> list[Requirement]:
    found = []
    for raw in lines:
        line = raw.split(" #")[0].strip()
        if line.startswith("#") or not _TORCH_TOKEN.search(line):
            continue
        line = re.sub(r"^[\w.!,{}-]+:\s+", "", line)  # a tox factor condition, "torch: ..."
        try:
            req = Requirement(line)
        except InvalidRequirement:
            pytest.fail(f"{where}: cannot parse {raw!r}, which mentions torch")
        if req.name == "torch":
            found.append(req)
    return found


def _pyproject_requirements(data: dict) -> list[str]:
    project = data.get("project", {})
    reqs = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    reqs += data.get("build-system", {}).get("requires", [])
    for group in data.get("dependency-groups", {}).values():
        reqs += [r for r in group if isinstance(r, str)]
    return reqs


def test_pyproject_pins_torch_exactly():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = data["project"]["optional-dependencies"]
    assert extras["torch"] == ["torch" + TORCH_PIN]
    reqs = _torch_requirements(_pyproject_requirements(data), "pyproject.toml")
    assert reqs, "pyproject.toml requires torch nowhere"
    for req in reqs:
        assert str(req.specifier) == TORCH_PIN, f"pyproject.toml: unpinned {req}"


def test_module_extras_are_installed_where_the_jax_tests_run():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras["equinox"]] == ["equinox"]
    assert [Requirement(r).name for r in extras["flax"]] == ["flax"]
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(ROOT / "tox.ini")
    for env in ("jax", "both"):
        assert {"jax", "equinox", "flax"} <= set(parser[f"testenv:{env}"]["extras"].split()), env


@pytest.mark.parametrize("pyproject", sorted(ROOT.glob("plugins/*/pyproject.toml")),
                         ids=lambda p: p.parent.name)
def test_plugin_distributions_pin_torch_exactly(pyproject):
    data = tomllib.loads(pyproject.read_text())
    reqs = _torch_requirements(_pyproject_requirements(data), str(pyproject))
    assert reqs, f"{pyproject} requires torch nowhere (its torch extra should pin it)"
    for req in reqs:
        assert str(req.specifier) == TORCH_PIN, f"{pyproject}: unpinned {req}"


def test_tox_and_requirement_files_pin_torch_exactly():
    checked = 0
    tox = ROOT / "tox.ini"
    if tox.exists():
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(tox)
        for section in parser.sections():
            for key, value in parser.items(section):
                lines = value.splitlines()
                if key != "deps":  # commands may install too: "pip install torch"
                    lines = [ln.split("pip install", 1)[1] for ln in lines if "pip install" in ln]
                    lines = [tok for ln in lines for tok in ln.split() if not tok.startswith("-")]
                for req in _torch_requirements(lines, f"tox.ini [{section}] {key}"):
                    checked += 1
                    assert str(req.specifier) == TORCH_PIN, f"tox.ini [{section}] {key}: unpinned {req}"
    for path in [*ROOT.glob("requirements*.txt"), *ROOT.glob("constraints*.txt")]:
        for req in _torch_requirements(path.read_text().splitlines(), path.name):
            checked += 1
            assert str(req.specifier) == TORCH_PIN, f"{path.name}: unpinned {req}"
    if checked == 0:  # then tox gets torch only through the pinned extra
        assert not tox.exists() or "extras" in tox.read_text()


def test_the_torch_pin_check_catches_loose_specifiers():
    loose = ["torch", "torch>=2.13", "torch~=2.13.0", "torch==2.13.*", "py311-torch: torch>2"]
    for line in loose:
        (req,) = _torch_requirements([line], "example")
        assert str(req.specifier) != TORCH_PIN
    ok = ["torch==2.13.0", "torch: torch==2.13.0", "deqcore[torch]", "deqcore_torch", "torchvision>=0.1"]
    assert [str(r.specifier) for ln in ok for r in _torch_requirements([ln], "example")] == [TORCH_PIN] * 2
