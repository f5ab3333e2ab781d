"""The distribution's name and version are written once (shared/version.py) and derived everywhere else."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

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
