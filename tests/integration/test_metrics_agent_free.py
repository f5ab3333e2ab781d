"""The agent stays free of the metrics library: not in its extra, never imported by its modules."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_agent_extra_has_no_prometheus_client_and_the_services_have() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("prometheus") for dep in extras["agent"])
    for service in ("api", "gateway", "fallback_ssh"):
        assert any(dep.startswith("prometheus-client") for dep in extras[service]), service


def test_agent_modules_and_shared_logging_do_not_import_it() -> None:
    code = (
        "import sys, pkgutil, importlib, services.agent\n"
        "for m in pkgutil.iter_modules(services.agent.__path__):\n"
        "    importlib.import_module('services.agent.' + m.name)\n"
        "import shared.logs, shared.settings, shared.natsx\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"
