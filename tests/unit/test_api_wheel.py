"""The agent wheel source: a configured file, a real build from this source tree, and clear failures."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import zipfile
from pathlib import Path

import pytest

from services.api.fleet.wheel import AgentWheel, WheelSource, WheelUnavailable, source_root
from shared.version import wheel_name


async def test_configured_wheel_is_read_once_with_its_hash(tmp_path: Path) -> None:
    """A configured wheel is served with its SHA-256; later calls reuse the first read."""
    path = tmp_path / wheel_name()
    path.write_bytes(b"wheel bytes")
    source = WheelSource(path, tmp_path / "wheels")
    first, second = await asyncio.gather(source.get(), source.get())
    assert first is second
    assert first == AgentWheel(path.name, b"wheel bytes", hashlib.sha256(b"wheel bytes").hexdigest())
    path.unlink()
    assert await source.get() is first


async def test_missing_or_misnamed_wheel_is_unavailable(tmp_path: Path) -> None:
    """A missing file or a name that is not *.whl is a 503-class error naming the problem."""
    with pytest.raises(WheelUnavailable, match="unreadable"):
        await WheelSource(tmp_path / "gone-1.0-py3-none-any.whl", tmp_path).get()
    (tmp_path / "agent.zip").write_bytes(b"x")
    with pytest.raises(WheelUnavailable, match=r"\*\.whl"):
        await WheelSource(tmp_path / "agent.zip", tmp_path).get()


async def test_failed_build_says_what_to_do(tmp_path: Path) -> None:
    """A source tree pip cannot build gives WheelUnavailable pointing at WARLOCK_API_AGENT_WHEEL."""
    root = tmp_path / "src"
    (root / "services").mkdir(parents=True)
    (root / "pyproject.toml").write_text("this is not toml [\n")
    with pytest.raises(WheelUnavailable, match="WARLOCK_API_AGENT_WHEEL"):
        await WheelSource(None, tmp_path / "wheels", root=root).get()


def test_source_root_is_the_project_directory() -> None:
    """The source root holds pyproject.toml and services/; outside a source tree there is none."""
    root = source_root()
    assert root is not None
    assert (root / "pyproject.toml").is_file()
    assert (root / "services" / "api" / "fleet" / "wheel.py").is_file()
    assert source_root(Path("/usr/lib/python3/x.py")) is None


async def test_real_wheel_builds_from_this_source_tree(tmp_path: Path) -> None:
    """Unconfigured, the wheel is built once with pip from this tree and holds the agent package."""
    source = WheelSource(None, tmp_path / "wheels")
    wheel = await source.get()
    assert wheel.name == wheel_name()  # distribution and version from the metadata, not a literal
    assert hashlib.sha256(wheel.data).hexdigest() == wheel.sha256
    assert (tmp_path / "wheels" / wheel.name).read_bytes() == wheel.data
    with zipfile.ZipFile(tmp_path / "wheels" / wheel.name) as archive:
        names = archive.namelist()
    assert "services/agent/cli.py" in names
    assert "shared/protocol.py" in names
    assert await source.get() is wheel


def broken_tree(tmp_path: Path) -> Path:
    """A source tree pip cannot build (its pyproject.toml is not TOML)."""
    root = tmp_path / "src"
    (root / "services").mkdir(parents=True)
    (root / "pyproject.toml").write_text("this is not toml [\n")
    return root


async def test_failed_build_is_remembered_and_pip_runs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After a failed build, callers (at once or later) get the same error without pip running again."""
    source = WheelSource(None, tmp_path / "wheels", root=broken_tree(tmp_path), failure_ttl=60)
    with caplog.at_level(logging.INFO, logger="services.api.fleet.wheel"):
        together = await asyncio.gather(source.get(), source.get(), return_exceptions=True)
        with pytest.raises(WheelUnavailable, match="not retried for another"):
            await source.get()
    assert all(isinstance(e, WheelUnavailable) for e in together)
    assert caplog.text.count("building the agent wheel from") == 1


async def test_failure_is_retried_after_its_ttl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Once the remembered failure expires, the next caller builds again."""
    source = WheelSource(None, tmp_path / "wheels", root=broken_tree(tmp_path), failure_ttl=0.1)
    with caplog.at_level(logging.INFO, logger="services.api.fleet.wheel"):
        with pytest.raises(WheelUnavailable):
            await source.get()
        await asyncio.sleep(0.2)
        with pytest.raises(WheelUnavailable, match="building the agent wheel failed"):
            await source.get()
    assert caplog.text.count("building the agent wheel from") == 2


def test_file_name_is_known_without_reading_or_building(tmp_path: Path) -> None:
    """The served name comes from the configuration (or the version), not from a read or a build."""
    assert (
        WheelSource(tmp_path / "gone-2.0-py3-none-any.whl", tmp_path).file_name()
        == "gone-2.0-py3-none-any.whl"
    )
    assert WheelSource(tmp_path, tmp_path / "wheels").file_name() == wheel_name()  # a directory
    assert WheelSource(None, tmp_path / "wheels", root=broken_tree(tmp_path)).file_name() == wheel_name()
    assert not (tmp_path / "wheels").exists()
