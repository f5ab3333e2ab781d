"""NATS credentials and server configuration: one nkey per role, and the config that enforces the matrix.

`ensure_nkeys` creates one nkey user seed file per role of `shared.permissions.ROLES` (``<role>.nk``, 0600,
in a 0700 directory; existing seeds are kept, so a restart keeps every identity). `render_server_config`
writes a complete nats-server config whose ``authorization`` block comes from
`permissions.render_authorization`: every user is one of those nkeys, there is no anonymous user and no
``no_auth_user``, so a client without a role's seed is refused. `warlock nats-config` (`main`) does both
for deploy/compose's init; `warlock run` calls the same functions.

A seed file is a secret (whoever holds it connects as that role); it is read by the connecting process
only (`read_seed`) and never logged.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.permissions import ROLES, render_authorization

SEED_SUFFIX = ".nk"
DEFAULT_MAX_PAYLOAD = "8MB"


class NkeyFileError(ValueError):
    """An nkey seed file that cannot be used: missing, unreadable, readable by others, or not a seed."""


def seed_file(directory: Path, role: str) -> Path:
    """Where `role`'s seed lives in `directory`."""
    if role not in ROLES:
        raise ValueError(f"unknown NATS role {role!r}; expected one of {sorted(ROLES)}")
    return directory / f"{role}{SEED_SUFFIX}"


def _nkeys() -> Any:
    """The nkeys module (imported on use: the agent never needs it)."""
    import nkeys  # type: ignore[import-untyped]

    return nkeys


def _new_seed() -> bytes:
    nkeys = _nkeys()
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def ensure_nkeys(directory: Path, roles: Sequence[str] = tuple(ROLES)) -> dict[str, Path]:
    """One user seed file per role in `directory` (0700), created when missing (0600); role → path."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)
    files: dict[str, Path] = {}
    for role in roles:
        path = seed_file(directory, role)
        if not path.exists():
            _write_private(path, _new_seed() + b"\n")
        path.chmod(0o600)
        files[role] = path
    return files


def read_seed(path: Path) -> bytes:
    """The seed in `path`, checked: a regular file, readable, 0600 or stricter, an nkey *user* seed.

    Raises NkeyFileError saying what is wrong (never quoting the file's content).
    """
    try:
        info = path.stat()
        data = path.read_bytes().strip()
    except OSError as exc:
        raise NkeyFileError(f"{path}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise NkeyFileError(f"{path}: not a regular file")
    if info.st_mode & 0o077:
        raise NkeyFileError(
            f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets others read it; it holds a NATS "
            "credential, make it 0600 (chmod 600)"
        )
    if not data.startswith(b"SU"):
        raise NkeyFileError(f"{path}: not an nkey user seed (a line starting with SU)")
    try:
        _nkeys().from_seed(bytearray(data)).wipe()
    except Exception as exc:  # nkeys raises its own ErrInvalidSeed, binascii and ValueError
        raise NkeyFileError(f"{path}: not a valid nkey seed ({type(exc).__name__})") from None
    return data


def public_nkey(path: Path) -> str:
    """The public user nkey (``U...``) of the seed in `path`."""
    pair = _nkeys().from_seed(bytearray(read_seed(path)))
    try:
        return str(pair.public_key.decode())
    finally:
        pair.wipe()


@dataclass(frozen=True)
class TlsFiles:
    """Paths (as the nats-server process sees them) of its certificate, key and the CA clients use."""

    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class Cluster:
    """Cluster routes of one node: its name, the cluster's, and its peers' route URLs.

    Nodes do not advertise their client URLs (``no_advertise``): clients keep the host names they were
    given, which their certificates name, instead of learning addresses TLS could not verify.

    `listen` is the address routes are accepted on (``0.0.0.0`` between containers; ``127.0.0.1`` for
    `warlock run --cluster`). `tls`: the routes' own certificate, key and CA, verified both ways, for a
    cluster whose clients connect without TLS (`warlock run --cluster` on loopback); without it, routes use
    the server's client `tls` (as in deploy/compose)."""

    name: str
    node: str
    port: int
    routes: tuple[str, ...]
    listen: str = "0.0.0.0"  # noqa: S104 - the compose default; overridden for a local cluster
    tls: TlsFiles | None = None


def _tls_lines(tls: TlsFiles, indent: str) -> str:
    rows = [f'cert_file: "{tls.cert}"', f'key_file: "{tls.key}"', f'ca_file: "{tls.ca}"', "timeout: 5"]
    return "\n".join(indent + row for row in rows)


def render_server_config(
    nkeys: Mapping[str, str],
    *,
    host: str = "127.0.0.1",
    port: int = 4222,
    max_payload: str = DEFAULT_MAX_PAYLOAD,
    tls: TlsFiles | None = None,
    cluster: Cluster | None = None,
    http_port: int | None = None,
) -> str:
    """A complete nats-server config: listen address, limits, optional TLS / cluster, and authorization.

    `nkeys` maps each role to its public nkey. With `tls`, client connections require TLS; cluster
    routes (with `cluster`) then use the same certificate, verified both ways against the CA (a node
    without a CA-signed certificate cannot join), unless the cluster names route TLS of its own
    (`Cluster.tls`).
    """
    lines = [
        "# Rendered by warlock (shared/natsauth.py) from shared/permissions.py: do not edit by hand.",
        f'host: "{host}"',
        f"port: {port}",
        f"max_payload: {max_payload}",
    ]
    if cluster is not None:
        lines.append(f'server_name: "{cluster.node}"')
    if http_port is not None:
        lines.append(f"http_port: {http_port}")
    if tls is not None:
        lines.append("tls {\n" + _tls_lines(tls, "  ") + "\n}")
    if cluster is not None:
        routes = ", ".join(f'"{route}"' for route in cluster.routes)
        block = [
            f'cluster {{\n  name: "{cluster.name}"\n  listen: "{cluster.listen}:{cluster.port}"\n'
            f"  routes: [{routes}]",
            "  no_advertise: true",
        ]
        route_tls = cluster.tls or tls
        if route_tls is not None:
            block.append("  tls {\n" + _tls_lines(route_tls, "    ") + "\n    verify: true\n  }")
        lines.append("\n".join(block) + "\n}")
    lines.append(render_authorization(nkeys))
    return "\n".join(lines)


def write_server_config(path: Path, nkey_dir: Path, **options: object) -> dict[str, Path]:
    """Create the role seeds in `nkey_dir` (kept if present) and write the server config to `path`
    (0600: it names every identity); return role → seed file."""
    files = ensure_nkeys(nkey_dir)
    text = render_server_config({role: public_nkey(p) for role, p in files.items()}, **options)  # type: ignore[arg-type]
    _write_private(path, text.encode())
    return files


# ----------------------------------------------------------------------------- `warlock nats-config`


def parser(prog: str = "warlock nats-config") -> argparse.ArgumentParser:
    """The `warlock nats-config` options (also added as a subcommand of `warlock`)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add the `nats-config` options to `p`."""
    p.add_argument("--dir", type=Path, required=True, help="where the config and nkeys/<role>.nk go")
    p.add_argument("--host", default="0.0.0.0", help="client listen address (default 0.0.0.0)")  # noqa: S104
    p.add_argument("--port", type=int, default=4222, help="client port (default 4222)")
    p.add_argument("--max-payload", default=DEFAULT_MAX_PAYLOAD)
    p.add_argument("--http-port", type=int, default=None, help="monitoring port (default: none)")
    p.add_argument("--tls-cert", help="server certificate, as the nats-server sees the path")
    p.add_argument("--tls-key", help="server key, as the nats-server sees the path")
    p.add_argument("--tls-ca", help="CA certificate clients and routes are verified with")
    p.add_argument("--cluster-name", help="with --node: the cluster's name")
    p.add_argument("--cluster-port", type=int, default=6222)
    p.add_argument(
        "--node", action="append", default=[], help="a cluster node's host name (repeat): one config each"
    )


def run(args: argparse.Namespace) -> int:
    """Write the nkeys and config(s) `args` asks for; print what was written (never a seed)."""
    tls_parts = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(tls_parts) and not all(tls_parts):
        print("warlock nats-config: --tls-cert, --tls-key and --tls-ca go together", file=sys.stderr)
        return 2
    if args.node and not args.cluster_name:
        print("warlock nats-config: --node needs --cluster-name", file=sys.stderr)
        return 2
    if args.node and not all(tls_parts):
        # routes without TLS carry no authentication: anything that reaches the route port joins the
        # cluster and bypasses the permission matrix
        print(
            "warlock nats-config: --node needs --tls-cert, --tls-key and --tls-ca (cluster routes are "
            "authenticated by certificates verified both ways; without TLS anyone reaching the route "
            "port could join)",
            file=sys.stderr,
        )
        return 2
    tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_ca) if all(tls_parts) else None
    directory: Path = args.dir
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    common = {"host": args.host, "port": args.port, "max_payload": args.max_payload, "tls": tls}
    common["http_port"] = args.http_port
    nkey_dir = directory / "nkeys"
    targets: list[tuple[Path, Cluster | None]] = []
    for node in args.node:
        routes = tuple(f"nats-route://{peer}:{args.cluster_port}" for peer in args.node if peer != node)
        targets.append(
            (directory / f"{node}.conf", Cluster(args.cluster_name, node, args.cluster_port, routes))
        )
    if not targets:
        targets.append((directory / "nats.conf", None))
    for path, cluster in targets:
        files = write_server_config(path, nkey_dir, cluster=cluster, **common)
        print(f"wrote {path}")
    for role, seed in files.items():
        print(f"nkey of {role}: {seed} (public {public_nkey(seed)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.natsauth` (the same as `warlock nats-config`)."""
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
