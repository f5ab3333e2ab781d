"""Start the real Warlock processes (token authority, gateways, agents) against a real nats-server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from services.dev.procs import BIN, Proc
from shared.tokens import generate_token, hash_token
from tests.support.natsserver import nkey_files, server_at
from tests.support.trust import TestSigner


def toml_value(value: Any) -> str:
    """Render a simple Python value as TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


class Gateway:
    """A running gateway process and its agent URL."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        match = proc.wait_for(r"gateway (\S+) listening on (wss?://[\d.]+:(\d+)/agent)")
        self.gateway_id = match.group(1)
        self.url = match.group(2)
        self.port = int(match.group(3))


class Api:
    """A running `warlock-api` process: its URL, database and bootstrap key."""

    def __init__(self, proc: Proc, database_url: str, key_file: Path) -> None:
        self.proc = proc
        self.database_url = database_url
        self.url = proc.wait_for(r'api listening on (http://[^\s"]+)', timeout=60).group(1)
        self.key = key_file.read_text().strip()

    @property
    def auth(self) -> dict[str, str]:
        """Headers carrying the bootstrap API key."""
        return {"Authorization": f"Bearer {self.key}"}


class Stack:
    """Processes of one test, all stopped by `close()`."""

    def __init__(self, root: Path, nats_url: str) -> None:
        self.root = root
        self.nats_url = nats_url
        self.tokens_file = root / "tokens.json"
        self.tokens_file.write_text(json.dumps({"hosts": {}}))
        self.procs: list[Proc] = []
        self._signer: TestSigner | None = None

    @property
    def signer(self) -> TestSigner:
        """The test's API signing key (`root`/signing.key): every agent this stack starts trusts it."""
        if self._signer is None:
            self._signer = TestSigner(self.root)
        return self._signer

    def env(self, role: str = "api", nats_url: str | None = None, **extra: str) -> dict[str, str]:
        """Environment for a child connecting to NATS as `role`: the NATS URL(s) (`nats_url`, else the
        stack's), the role's nkey seed file (the test server's, else the one in this stack's ``nkeys/``,
        which a server started later in the same directory uses too), plus `extra`."""
        url = nats_url or self.nats_url
        server = server_at(url)
        seed = server.nkey_file(role) if server is not None else nkey_files(self.root)[role]
        if server is not None and server.ca_file is not None:
            extra = {"WARLOCK_NATS_CA_FILE": str(server.ca_file), **extra}
        return {
            "WARLOCK_NATS_URL": url,
            "WARLOCK_NATS_NKEY_FILE": str(seed),
            "WARLOCK_LOG_LEVEL": "INFO",
            **extra,
        }

    def add_host(self, host_id: str, token: str | None = None) -> str:
        """Register `host_id` with the token authority; return its (new) token."""
        return self.add_hosts({host_id: token or generate_token()})[host_id]

    def add_hosts(self, tokens: dict[str, str]) -> dict[str, str]:
        """Register many hosts at once (host id → token); return the same mapping."""
        data = json.loads(self.tokens_file.read_text())
        data["hosts"].update({host: hash_token(token) for host, token in tokens.items()})
        tmp = self.tokens_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.tokens_file)
        return tokens

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        """Start a process owned by this stack."""
        proc = Proc(name, argv, self.root, env)
        self.procs.append(proc)
        return proc

    def start_authority(self) -> Proc:
        """Start the file-backed token authority and wait until it serves."""
        proc = self.start(
            "authority",
            [str(BIN / "warlock"), "token-authority", "--file", str(self.tokens_file)],
            self.env("api"),
        )
        proc.wait_for("token authority ready")
        return proc

    def start_gateway(
        self, name: str = "gw1", port: int = 0, nats_url: str | None = None, **settings: str
    ) -> Gateway:
        """Start a gateway on `port` (0: any) and wait until it listens (`nats_url`: its NATS URL list)."""
        env = self.env("gateway", nats_url, WARLOCK_GATEWAY_PORT=str(port), WARLOCK_GATEWAY_GATEWAY_ID=name)
        env.update({f"WARLOCK_GATEWAY_{k.upper()}": v for k, v in settings.items()})
        return Gateway(self.start(name, [str(BIN / "warlock-gateway")], env))

    def start_api(
        self,
        database_url: str,
        name: str = "api",
        *,
        port: int = 0,
        nats_url: str | None = None,
        **settings: str,
    ) -> Api:
        """Start `warlock-api` on `database_url` (the token authority too) and wait until it listens;
        `settings` are more ``WARLOCK_API_<NAME>`` values, `nats_url` its own NATS URL list. A second API
        on the same database reads the bootstrap key the first one wrote (the same ``api-key`` file)."""
        key_file = self.root / "api-key"
        env = self.env(
            "api",
            nats_url,
            WARLOCK_API_PORT=str(port),
            WARLOCK_API_DATABASE_URL=database_url,
            WARLOCK_API_API_KEY_FILE=str(key_file),
            WARLOCK_API_SIGNING_KEY_FILE=str(self.signer.key_file),
        )
        env.update({f"WARLOCK_API_{k.upper()}": v for k, v in settings.items()})
        return Api(self.start(name, [str(BIN / "warlock-api")], env), database_url, key_file)

    def start_fallback(self, key_file: Path, name: str = "ssh-worker", nats_url: str | None = None) -> Proc:
        """Start the SSH worker with `key_file`, trusting the stack's API key; wait until it serves."""
        env = self.env(
            "ssh-worker",
            nats_url,
            WARLOCK_SSH_KEY_FILE=str(key_file),
            WARLOCK_SSH_TRUSTED_KEYS=self.signer.public_key,
        )
        proc = self.start(name, [str(BIN / "warlock-fallback-ssh")], env)
        proc.wait_for(r"ssh fallback worker \S+ ready")
        return proc

    def agent_token(self, api: Api, host: str) -> str:
        """Issue `host` an agent token in the API's database (`warlock agent-token`); return it."""
        env = {**os.environ, **self.env("api", WARLOCK_API_DATABASE_URL=api.database_url)}
        out = subprocess.run(
            [str(BIN / "warlock"), "agent-token", host], env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.strip()

    async def start_known_agent(
        self, api: Api, name: str, host_id: str, urls: list[str], wait: bool = True, **cfg: Any
    ) -> Proc:
        """Issue `host_id` (registered in `api`) a token, record the agent's key in the API's database (as
        `warlock agent-key` does), and start its agent: its results verify, its presence counts."""
        from services.api.settings import ApiSettings
        from services.ctl import admin
        from shared import signing

        token = await asyncio.to_thread(self.agent_token, api, host_id)
        identity = self.root / f"{name}.key"
        key, _ = signing.ensure_private(identity)
        settings = ApiSettings(database_url=api.database_url, api_key_file=self.root / "unused-api-key")
        await admin.register_agent_key(settings, host_id, signing.public_text(key))
        return await asyncio.to_thread(
            self.start_agent, name, host_id, token, urls, wait, identity_key_file=str(identity), **cfg
        )

    def write_agent_config(self, name: str, host_id: str, token: str, urls: list[str], **cfg: Any) -> Path:
        """Write an agent config file (0600) and return its path.

        The agent's identity key is ``<name>.key`` in the test's directory (made by the agent at start) and
        it trusts the stack's `signer`; pass ``trusted_keys=[...]`` (or any other key) to override.
        """
        values: dict[str, Any] = {
            "host_id": host_id,
            "token": token,
            "gateway_urls": urls,
            "trusted_keys": [self.signer.public_key],
            "identity_key_file": str(self.root / f"{name}.key"),
            "ledger_path": str(self.root / f"{name}-ledger.jsonl"),
            "metrics_interval": 30.0,
            "backoff_initial": 0.1,
            "backoff_max": 1.0,
        }
        values.update(cfg)
        path = self.root / f"{name}.conf"
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        path.chmod(0o600)
        return path

    def start_agent(
        self, name: str, host_id: str, token: str, urls: list[str], wait: bool = True, **cfg: Any
    ) -> Proc:
        """Start an agent process; by default wait until its session is established."""
        config = self.write_agent_config(name, host_id, token, urls, **cfg)
        proc = self.start(name, [str(BIN / "warlock-agent"), "run", "--config", str(config)], self.env())
        if wait:
            proc.wait_for(r"session \S+ established with")
        return proc

    def close(self) -> None:
        """Stop every process, newest first."""
        for proc in reversed(self.procs):
            proc.stop(timeout=5)  # also closes the log of a process that already exited
