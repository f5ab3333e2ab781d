"""The agent's install, configure and uninstall scripts (POSIX sh), shipped as package data.

One source for both install paths: the SSH worker pushes `script("install.sh")` to a host; the API
serves the same text as ``GET /agent/install.sh`` for hosts that pull. Each script file carries a
``# @include common.sh`` line that `script` replaces with ``common.sh``, so every returned script is
self-contained. The systemd unit is a heredoc inside ``install.sh``; `unit_text` renders it for a prefix.
"""

from __future__ import annotations

import re
from importlib.resources import files
from string import Template

SCRIPTS = ("install.sh", "configure.sh", "uninstall.sh")
UNIT_NAME = "warlock-agent.service"
_INCLUDE = re.compile(r"^# @include ([a-z_]+\.sh)$", re.MULTILINE)
_UNIT = re.compile(r'cat >"\$UNIT_TMP" <<EOF_UNIT\n(.*?)\nEOF_UNIT\n', re.DOTALL)
_PREFIX = re.compile(r"^/[A-Za-z0-9_./-]*$")


def _read(name: str) -> str:
    """The text of one data file of this package."""
    return files(__name__).joinpath(name).read_text(encoding="utf-8")


def script(name: str) -> str:
    """The self-contained text of `name` (one of `SCRIPTS`), with ``common.sh`` inlined."""
    if name not in SCRIPTS:
        raise ValueError(f"unknown install script {name!r}; expected one of {', '.join(SCRIPTS)}")
    return _INCLUDE.sub(lambda m: _read(m.group(1)).rstrip("\n"), _read(name))


def paths(prefix: str = "/") -> dict[str, str]:
    """Where the installer puts things under `prefix` (the variables the scripts use)."""
    if not _PREFIX.match(prefix):
        raise ValueError("prefix must be an absolute path of [A-Za-z0-9_./-]")
    root = prefix.rstrip("/")
    venv = f"{root}/opt/warlock-agent"
    return {
        "VENV": venv,
        "AGENT_BIN": f"{venv}/bin/warlock-agent",
        "CONF_DIR": f"{root}/etc/warlock",
        "CONF": f"{root}/etc/warlock/agent.conf",
        "STATE_DIR": f"{root}/var/lib/warlock-agent",
        "LEDGER": f"{root}/var/lib/warlock-agent/ledger.jsonl",
        "PIDFILE": f"{root}/var/lib/warlock-agent/agent.pid",
        "LOG": f"{root}/var/log/warlock-agent.log",
        "UNIT": f"{root}/etc/systemd/system/{UNIT_NAME}",
    }


def unit_text(prefix: str = "/") -> str:
    """The ``warlock-agent.service`` unit that ``install.sh`` writes for `prefix`."""
    found = _UNIT.search(_read("install.sh"))
    if found is None:  # pragma: no cover - guarded by the unit tests
        raise RuntimeError("install.sh has no EOF_UNIT heredoc")
    return Template(found.group(1)).substitute(paths(prefix)) + "\n"
