"""Provision a simulated fleet in the API's database, in bulk: hosts, agent tokens, agent public keys.

For the swarm (`services.dev.swarm`): host ids ``swarm-00001`` … , one agent token each, of which only
the SHA-256 is stored (as `services.api.store.crud.replace_agent_token` does), and each host's agent
public key (the swarm derives its agents' keys from their tokens: `swarm_public_key`). The tokens go to a
JSON file ``{"<host_id>": "<token>"}`` (0600) that ``warlock swarm --tokens`` reads. Rows go in with one
executemany per table (10,000 hosts in about a second on PostgreSQL): setup, not part of a measurement.

    python -m tests.support.fleet --database-url URL --count 10000 --tokens swarm.json [--prefix swarm]

The schema is created first if missing (what the API's start does; it records the schema version itself).
Host addresses are ``<host_id>.invalid`` (a name that never resolves): a command that falls back to SSH
for a swarm host fails instead of reaching anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import SQLModel

from services.api.store.db import make_engine
from services.api.store.models import AgentConnection, AgentStatus, Host, utcnow
from services.dev.swarm import swarm_public_key
from shared.ids import is_host_id
from shared.tokens import generate_token, hash_token

PREFIX = "swarm"


def host_ids(count: int, prefix: str = PREFIX, first: int = 1) -> list[str]:
    """``<prefix>-00001`` … for `count` hosts starting at number `first`."""
    return [f"{prefix}-{i:05d}" for i in range(first, first + count)]


def write_tokens(path: Path, tokens: dict[str, str]) -> None:
    """Write the swarm's tokens file (0600, replaced atomically)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(tokens, out)
    os.replace(tmp, path)


def fleet_rows(tokens: dict[str, str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The host rows and agent rows (token hash, public key) for `tokens`."""
    now = utcnow()
    hosts: list[dict[str, Any]] = []
    agents: list[dict[str, Any]] = []
    for host, token in tokens.items():
        hosts.append(
            {
                "id": host,
                "address": f"{host}.invalid",
                "ssh_port": 22,
                "ssh_user": "root",
                "labels": {"fleet": "swarm"},
                "host_key": None,
                "host_key_fingerprint": None,
                "created_at": now,
                "updated_at": now,
            }
        )
        agents.append(
            {
                "host_id": host,
                "status": str(AgentStatus.DISCONNECTED),
                "public_key": swarm_public_key(token),
                "token_hash": hash_token(token),
                "updated_at": now,
            }
        )
    return hosts, agents


async def provision(
    database_url: str, count: int, tokens_file: Path | None = None, prefix: str = PREFIX, first: int = 1
) -> dict[str, str]:
    """Create `count` swarm hosts with a fresh agent token and agent key each; return host → token.

    The hosts must not exist yet (IntegrityError otherwise: nothing is inserted then)."""
    tokens = {host: generate_token() for host in host_ids(count, prefix, first)}
    hosts, agents = fleet_rows(tokens)
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(SQLModel.metadata.create_all)
            await conn.execute(insert(Host.__table__), hosts)  # type: ignore[attr-defined]
            await conn.execute(insert(AgentConnection.__table__), agents)  # type: ignore[attr-defined]
    finally:
        await engine.dispose()
    if tokens_file is not None:
        write_tokens(tokens_file, tokens)
    return tokens


def main(argv: list[str] | None = None) -> int:
    """Command line: provision and say how long it took."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.fleet", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--database-url", required=True, help="e.g. postgresql+asyncpg://postgres@127.0.0.1/db"
    )
    parser.add_argument("--count", type=int, required=True, help="how many hosts")
    parser.add_argument("--tokens", type=Path, required=True, help="where to write the swarm's tokens file")
    parser.add_argument("--prefix", default=PREFIX, help="host id prefix (default swarm)")
    parser.add_argument("--first", type=int, default=1, help="number of the first host (default 1)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if not is_host_id(f"{args.prefix}-{args.first:05d}"):
        parser.error("--prefix: host ids are [a-z0-9_-], at most 63 characters")
    began = time.perf_counter()
    try:
        asyncio.run(provision(args.database_url, args.count, args.tokens, args.prefix, args.first))
    except (SQLAlchemyError, OSError) as exc:
        print(f"fleet: cannot provision: {type(exc).__name__}: {str(exc)[:300]}", file=sys.stderr)
        return 1
    took = time.perf_counter() - began
    print(f"fleet: {args.count} hosts provisioned in {took:.2f}s; tokens in {args.tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
