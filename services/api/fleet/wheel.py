"""The agent wheel the API ships to hosts: a prebuilt file (``WARLOCK_API_AGENT_WHEEL``) or built once.

``WARLOCK_API_AGENT_WHEEL`` may also name a directory: the API takes the wheel of its own distribution
and version from it (`shared.version.wheel_name`, e.g. ``warlock_fleet-0.1.0-py3-none-any.whl``).
Without a configured wheel, the first request that needs it runs
``<python> -m pip wheel --no-deps --no-build-isolation -w <wheel_dir>/<tmp> <source root>`` in a thread,
where the source root is the directory holding ``pyproject.toml`` above ``services/``. The bytes, SHA-256
and file name are kept in memory for the life of the process. At most one read or build runs at a time,
and a failure is remembered for `FAILURE_TTL` seconds: requests meanwhile get the same `WheelUnavailable`
(503, with a message saying what to do) without running pip again, so an anonymous client of
``GET /agent/warlock_agent.whl`` cannot make the API run ``pip wheel`` at will. The file name the API serves
(`WheelSource.file_name`) is known without reading or building anything.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from services.api.errors import DependencyUnavailable
from shared.version import wheel_name

log = logging.getLogger(__name__)

BUILD_TIMEOUT = 300.0
FAILURE_TTL = 60.0  # seconds a failed read or build is answered from memory
WHEEL_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\.whl$")


class WheelUnavailable(DependencyUnavailable):
    """The agent wheel could not be read or built."""


@dataclass(frozen=True)
class AgentWheel:
    """A wheel file's name, bytes and SHA-256 hex digest."""

    name: str
    data: bytes
    sha256: str

    @classmethod
    def read(cls, path: Path) -> AgentWheel:
        """Load the wheel at `path`; WheelUnavailable if it is unreadable or not named like a wheel."""
        if not WHEEL_NAME.fullmatch(path.name):
            raise WheelUnavailable(f"agent wheel {path.name!r} is not named like a wheel (*.whl)")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise WheelUnavailable(f"agent wheel {path} unreadable: {exc.strerror or exc}") from exc
        return cls(path.name, data, hashlib.sha256(data).hexdigest())


def source_root(start: Path | None = None) -> Path | None:
    """The directory holding ``pyproject.toml`` above the ``services`` package, if this is a source tree."""
    here = (start or Path(__file__)).resolve()
    for parent in here.parents:
        if (parent / "pyproject.toml").is_file() and (parent / "services").is_dir():
            return parent
    return None


def build_wheel(root: Path, out_dir: Path, timeout: float = BUILD_TIMEOUT) -> AgentWheel:
    """Build the project's wheel from `root` into a fresh directory under `out_dir` (blocking)."""
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = Path(tempfile.mkdtemp(prefix="build-", dir=out_dir))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    cmd += ["--disable-pip-version-check", "-w", str(target), str(root)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(target, ignore_errors=True)
        raise WheelUnavailable(f"building the agent wheel failed: {type(exc).__name__}") from exc
    wheels = sorted(target.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        shutil.rmtree(target, ignore_errors=True)
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if "error" in ln.lower()]
        why = lines[-1][:300] if lines else f"pip exited with {done.returncode}"
        raise WheelUnavailable(
            f"building the agent wheel failed ({why}); install 'wheel' (or setuptools>=70.1) in the API's "
            "environment, or set WARLOCK_API_AGENT_WHEEL to a prebuilt wheel"
        )
    final = out_dir / wheels[0].name
    wheels[0].replace(final)
    shutil.rmtree(target, ignore_errors=True)
    return AgentWheel.read(final)


class WheelSource:
    """Provides the agent wheel, reading or building it once per process (a failure: once a minute)."""

    def __init__(
        self,
        configured: Path | None,
        wheel_dir: Path,
        root: Path | None = None,
        failure_ttl: float = FAILURE_TTL,
    ) -> None:
        self.configured = configured
        self.wheel_dir = wheel_dir
        self.root = root if root is not None else source_root()
        self.failure_ttl = failure_ttl
        self._wheel: AgentWheel | None = None
        self._failure: tuple[WheelUnavailable, float] | None = None  # the error and when it expires
        self._lock = asyncio.Lock()

    def file_name(self) -> str:
        """The wheel's file name, without reading or building it: a configured file's own name, else this
        distribution's and version's (`shared.version.wheel_name`)."""
        if self._wheel is not None:
            return self._wheel.name
        if self.configured is not None and not self.configured.is_dir():
            return self.configured.name
        return wheel_name()

    async def get(self) -> AgentWheel:
        """The wheel; the first call reads or builds it (in a thread), later calls reuse it. A failure is
        raised again without retrying for `failure_ttl` seconds."""
        if self._wheel is not None:
            return self._wheel
        async with self._lock:
            if self._wheel is None:
                self._raise_remembered()
                try:
                    self._wheel = await asyncio.to_thread(self._load)
                except WheelUnavailable as exc:
                    log.warning("agent wheel unavailable (not retried for %gs): %s", self.failure_ttl, exc)
                    self._failure = (exc, time.monotonic() + self.failure_ttl)
                    raise
                self._failure = None
                log.info("agent wheel %s ready (sha256 %s)", self._wheel.name, self._wheel.sha256)
        return self._wheel

    def _raise_remembered(self) -> None:
        if self._failure is None:
            return
        exc, until = self._failure
        left = until - time.monotonic()
        if left <= 0:
            self._failure = None
            return
        raise WheelUnavailable(f"{exc.detail} (not retried for another {left:.0f}s)")

    def _load(self) -> AgentWheel:
        if self.configured is not None and self.configured.is_dir():
            # a directory (the Docker image's dist/): the wheel of this very distribution and version
            return AgentWheel.read(self.configured / wheel_name())
        if self.configured is not None:
            return AgentWheel.read(self.configured)
        if self.root is None:
            raise WheelUnavailable(
                "no agent wheel: this API is not running from a source tree; set WARLOCK_API_AGENT_WHEEL"
            )
        log.info("building the agent wheel from %s", self.root)
        return build_wheel(self.root, self.wheel_dir)
