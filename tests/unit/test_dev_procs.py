"""The one process harness (`services.dev.procs.Proc`): what the launcher, the tests and bench rely on."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.dev.procs import Proc, WaitFailed, rss_kib

PY = sys.executable


def test_header_per_run_hides_earlier_runs(tmp_path: Path) -> None:
    """A launcher child's log keeps every run, each after a header; a run reads only its own lines."""
    first = Proc("x", [PY, "-c", "print('ready', flush=True)"], tmp_path, header="run 1")
    first.wait_for("ready")
    assert first.popen.wait(10) == 0
    second = Proc("x", [PY, "-c", "import time; time.sleep(30)"], tmp_path, header="run 2")
    try:
        with pytest.raises(WaitFailed, match=r"no 'ready' in 0\.3s"):
            second.wait_for("ready", timeout=0.3)  # the first run's line is not this run's
        text = (tmp_path / "x.log").read_text()
        assert text.count("=====") == 4
        assert "run 1" in text
        assert "run 2" in text
        assert (tmp_path / "x.log").stat().st_mode & 0o777 == 0o600
        assert second.log() == ""
    finally:
        assert second.stop() == -signal.SIGTERM


def test_after_offset_count_and_exit(tmp_path: Path) -> None:
    """`after` skips what was already seen; an exited process fails the wait with its code and log."""
    proc = Proc("y", [PY, "-c", "print('a 1'); print('a 2', flush=True)"], tmp_path, {"UNUSED": "1"})
    first = proc.wait_for(r"a \d")
    assert first.group(0) == "a 1"
    assert proc.wait_for(r"a \d", after=first.end()).group(0) == "a 2"
    proc.popen.wait(10)
    assert proc.count(r"a \d") == 2
    with pytest.raises(WaitFailed, match="y exited 0") as failed:
        proc.wait_for("never")
    assert isinstance(failed.value, AssertionError)  # a test fails with the log
    assert isinstance(failed.value, RuntimeError)  # the launcher reports it and stops


def test_rss_of_a_running_process(tmp_path: Path) -> None:
    """rss_kib reads VmRSS; kill reaps."""
    proc = Proc("z", [PY, "-c", "import time; print('up', flush=True); time.sleep(30)"], tmp_path)
    proc.wait_for("up")
    assert rss_kib(proc.pid) > 1000
    proc.kill()
    assert proc.popen.returncode == -signal.SIGKILL


def test_die_with_parent_and_own_session(tmp_path: Path) -> None:
    """A launcher child is in its own session and gets SIGTERM when the launcher is SIGKILLed."""
    pid_file = tmp_path / "child.pid"
    parent_code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from services.dev.procs import Proc\n"
        f"p = Proc('c', [sys.executable, '-c', 'import time; time.sleep(60)'], Path({str(tmp_path)!r}),"
        " new_session=True, die_with_parent=True)\n"
        f"Path({str(pid_file)!r}).write_text(str(p.pid))\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([PY, "-c", parent_code], cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 15
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline
            assert parent.poll() is None
            time.sleep(0.02)
        child = int(pid_file.read_text())
        assert os.getsid(child) == child != os.getsid(parent.pid)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and "Z" not in _state(child):
            assert time.monotonic() < deadline, "the child outlived its launcher"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if pid_file.exists() and pid_file.read_text():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
