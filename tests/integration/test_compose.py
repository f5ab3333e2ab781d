"""deploy/compose checked without a Docker engine: the file against the Compose specification's schema,
every command against this project's console scripts, every WARLOCK_ variable against the settings, the
nginx config with Debian's `nginx -t`, and what the images are built from.

The schema is the Compose specification's own (tests/data/compose-spec, Apache-2.0, with its licence),
vendored so the test needs no network.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import trustme
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from services.api.settings import ApiSettings
from services.fallback_ssh.settings import FallbackSettings
from services.gateway.settings import GatewaySettings
from shared.settings import NatsSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
SCHEMA = json.loads((ROOT / "tests" / "data" / "compose-spec" / "compose-spec.json").read_text())
SCRIPTS = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SETTINGS: dict[str, type[BaseSettings]] = {
    "warlock-api": ApiSettings,
    "warlock-gateway": GatewaySettings,
    "warlock-fallback-ssh": FallbackSettings,
}


def env_names(cls: type[BaseSettings]) -> set[str]:
    """Every environment variable `cls` reads (its prefix + field, or the field's aliases)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names: set[str] = set()
    for name, info in cls.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(c).upper() for c in alias.choices)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def warlock_services() -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile."""
    return {
        name: service
        for name, service in COMPOSE["services"].items()
        if service.get("build", {}).get("dockerfile") == "deploy/compose/Dockerfile"
    }


def test_compose_file_validates_against_the_compose_specification() -> None:
    """The file (anchors and merges resolved, as Compose reads it) is valid Compose."""
    jsonschema.validate(COMPOSE, SCHEMA)
    broken = {
        **COMPOSE,
        "services": {**COMPOSE["services"], "api": {**COMPOSE["services"]["api"], "ports": 8}},
    }
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.validate(broken, SCHEMA)


def test_every_warlock_service_runs_a_console_script_of_this_project() -> None:
    """Each service built from our image runs one of pyproject's console scripts (the init helper runs
    `warlock nats-config` through sh)."""
    services = warlock_services()
    assert {"api", "gateway", "fallback-ssh", "nats-config"} <= set(services)
    for name, service in services.items():
        command = service["command"]
        through_shell = service.get("entrypoint") == ["sh", "-ec"]
        first = command[0].split()[0] if through_shell else command[0]
        assert first in SCRIPTS, (name, first)


def test_every_warlock_variable_is_a_setting_of_the_service_that_gets_it() -> None:
    """No WARLOCK_ variable in the file is a typo or a setting that no longer exists."""
    checked = 0
    for name, service in warlock_services().items():
        env = service.get("environment", {})
        command = service["command"][0]
        cls = SETTINGS.get(command, NatsSettings)
        known = env_names(cls)
        for var in env:
            if var.startswith("WARLOCK_"):
                assert var in known, f"{name}: {var} is not a field of {cls.__name__}"
                checked += 1
    assert checked >= 12
    # and the ones init.sh writes into env files
    init = (COMPOSE_DIR / "init.sh").read_text() + COMPOSE["services"]["nats-config"]["command"][0]
    assert "WARLOCK_SSH_TRUSTED_KEYS" in env_names(FallbackSettings)
    assert "WARLOCK_SSH_TRUSTED_KEYS=" in init
    assert "WARLOCK_DATABASE_URL" in env_names(ApiSettings)
    assert "WARLOCK_DATABASE_URL=" in init


def test_no_secret_is_written_in_the_compose_file() -> None:
    """The database password comes from a secret file init.sh makes, not from the compose file."""
    text = (COMPOSE_DIR / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:" not in text
    assert not re.search(r"postgresql\+asyncpg://\w+:\w+@", text)
    postgres = COMPOSE["services"]["postgres"]["environment"]
    assert postgres["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")


def test_builds_need_no_generated_files_and_send_no_secrets() -> None:
    """The demo host builds without init.sh (its key is mounted at run time), a failed apt-get fails the
    build, and the build contexts exclude config/ (keys) and .warlock/."""
    demo = (COMPOSE_DIR / "Dockerfile.demo-host").read_text()
    assert "COPY" not in demo
    assert "|| true" not in demo
    assert "/run/demo/authorized_keys" in " ".join(COMPOSE["services"]["demo-host"]["volumes"])
    root_ignore = (ROOT / ".dockerignore").read_text().split()
    assert root_ignore[0:1] == ["*"] or "*" in root_ignore  # everything out, then only what is copied
    copied = re.findall(r"^COPY (\S+)", (COMPOSE_DIR / "Dockerfile").read_text(), re.M)
    for path in copied:
        assert f"!{path.rstrip('/').removeprefix('./')}" in root_ignore or path in ("pyproject.toml",), path
    assert (COMPOSE_DIR / ".dockerignore").read_text().split()[-1] == "*"


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is installed by .ci/run")
def test_nginx_accepts_the_shipped_config(tmp_path: Path) -> None:
    """`nginx -t` on the shipped config, with test certificates in place of config/tls."""
    ca = trustme.CA()
    cert = ca.issue_cert("lb", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "lb.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "lb.key"))
    conf = (COMPOSE_DIR / "nginx.conf").read_text().replace("/etc/nginx/tls/", f"{tmp_path}/")
    (tmp_path / "nginx.conf").write_text(conf)
    (tmp_path / "logs").mkdir()

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NGINX, "-t", "-c", str(path), "-p", str(tmp_path), "-g", f"pid {tmp_path}/nginx.pid;"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    done = check(tmp_path / "nginx.conf")
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
    (tmp_path / "bad.conf").write_text(conf.replace("proxy_read_timeout 120s;", "proxy_read_timeout;"))
    assert check(tmp_path / "bad.conf").returncode != 0  # the check can fail


def test_nginx_is_sized_and_timed_for_agents_and_long_commands() -> None:
    """worker_connections sized for thousands of agents (two connections each), upstreams re-resolved
    through Docker's DNS, and an exec's read timeout longer than the longest command."""
    conf = (COMPOSE_DIR / "nginx.conf").read_text()
    connections = int(re.search(r"worker_connections (\d+);", conf).group(1))  # type: ignore[union-attr]
    assert connections >= 4096
    assert "resolver 127.0.0.11" in conf
    assert "upstream " not in conf  # a static upstream resolves once, at start
    exec_timeouts = re.findall(
        r"location ~ \^/api/hosts/\[\^/\]\+/exec\$ \{[^}]*proxy_read_timeout (\d+)s", conf
    )
    assert exec_timeouts
    assert all(int(t) > 86_400 + ApiSettings.model_fields["ssh_grace"].default for t in exec_timeouts)
