"""The distribution's name and version are written once (shared/version.py) and derived everywhere else."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from services.api.fleet.wheel import build_wheel
from shared.version import DISTRIBUTION, __version__, wheel_name

REPO = Path(__file__).resolve().parents[2]


def test_distribution_is_not_the_unrelated_pypi_warlock() -> None:
    """pyproject names `warlock-fleet` (free on PyPI when chosen); extras refer to it; version is dynamic."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION == "warlock-fleet"
    assert "version" not in project
    assert project["dynamic"] == ["version"]
    assert all(not d.startswith("warlock[") for d in project["optional-dependencies"]["dev"])


def test_installed_metadata_matches_the_source() -> None:
    """The metadata of the installed distribution is made from shared/version.py."""
    assert metadata.version(DISTRIBUTION) == __version__


def test_wheel_name_follows_the_wheel_spec() -> None:
    """Name escaped with underscores, version as given, pure-Python tags."""
    assert wheel_name() == f"warlock_fleet-{__version__}-py3-none-any.whl"
    assert wheel_name("a.b-c", "1.0") == "a_b_c-1.0-py3-none-any.whl"


def test_no_place_writes_the_wheel_name_or_version() -> None:
    """Dockerfile, install script and README quote no versioned wheel name (they derive it)."""
    literal = re.compile(r"warlock[-_]?(fleet)?-\d+\.\d+\.\d+")
    for path in (REPO / "deploy/compose/Dockerfile", REPO / "shared/install/install.sh", REPO / "README.md"):
        assert not literal.search(path.read_text()), path
    readme = (REPO / "README.md").read_text()
    assert "pip install 'warlock[" not in readme


SWAGGER = "services/api/http/static/swagger-ui"


def _clean_copy(tmp_path: Path) -> Path:
    """The source tree without build artefacts: a stale build/ or *.egg-info/SOURCES.txt would put files in
    the archives that the package configuration alone does not (and hide a missing package-data line)."""
    junk = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache")
    root = tmp_path / "src"
    for part in ("pyproject.toml", "README.md"):
        root.mkdir(exist_ok=True)
        shutil.copy2(REPO / part, root / part)
    for part in ("shared", "services"):
        shutil.copytree(REPO / part, root / part, ignore=junk)
    return root


def _swagger_manifest() -> dict[str, dict[str, object]]:
    files: dict[str, dict[str, object]] = json.loads((REPO / SWAGGER / "MANIFEST.json").read_text())["files"]
    return files


def test_wheel_ships_the_vendored_swagger_ui(tmp_path: Path) -> None:
    """The wheel (`pip wheel . --no-deps`, as the Dockerfile builds it) holds every vendored Swagger UI file,
    byte for byte as the manifest says, with the manifest and the licence: /docs works from an install."""
    wheel = build_wheel(_clean_copy(tmp_path), tmp_path / "out")
    with zipfile.ZipFile(io.BytesIO(wheel.data)) as archive:
        names = set(archive.namelist())
        assert f"{SWAGGER}/MANIFEST.json" in names
        for name, entry in _swagger_manifest().items():
            data = archive.read(f"{SWAGGER}/{name}")
            assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert {f"{SWAGGER}/LICENSE", f"{SWAGGER}/NOTICE"} <= names


def test_sdist_ships_the_vendored_swagger_ui(tmp_path: Path) -> None:
    """The sdist carries the same files (a wheel built from it has them too)."""
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "out")],
        cwd=_clean_copy(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    sdist = tmp_path / "out" / done.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    wanted = {f"{SWAGGER}/{name}" for name in [*_swagger_manifest(), "MANIFEST.json"]}
    assert wanted <= names, wanted - names
