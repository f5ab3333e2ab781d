"""Baseline for `make bench`: the same chain built from the raw libraries, no Warlock code.

    python -m bench.raw_chain bridge NATS_URL PORT [NKEY_FILE]   nats-py subscriber ⇄ websockets server
    python -m bench.raw_chain agent WS_URL           websockets client that spawns /bin/sh -c CMD
    python -m bench.raw_chain swarm WS_URL COUNT     COUNT idle websocket clients (memory baseline)

The bridge gives each connection one NATS subscription (`raw.<n>.exec`, queue group) and, like the
gateway, answers from a task so one subject's requests do not wait for each other.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import resource
import sys

import nats
from nats.aio.msg import Msg
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve


async def bridge(nats_url: str, port: int, nkey_file: str | None = None) -> None:
    """Serve websockets on `port`; bridge `warlock.agent.raw-<n>.exec` requests to connection n.

    It connects with the gateway role's nkey (and inbox prefix), so the server checks its permissions as
    it does a gateway's, and subscribes where a gateway may."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    nc = await nats.connect(nats_url, nkeys_seed=nkey_file, inbox_prefix="_INBOX_gateway")
    counter = itertools.count()
    tasks: set[asyncio.Task[None]] = set()

    async def handler(ws: ServerConnection) -> None:
        n = next(counter)
        pending: dict[str, asyncio.Future[str]] = {}
        ids = itertools.count()

        async def forward(msg: Msg) -> None:
            cid = str(next(ids))
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            pending[cid] = fut
            await ws.send(json.dumps({"id": cid, "command": json.loads(msg.data)["command"]}))
            await msg.respond((await fut).encode())

        async def on_msg(msg: Msg) -> None:
            task = asyncio.create_task(forward(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        sub = await nc.subscribe(f"warlock.agent.raw-{n}.exec", queue="raw", cb=on_msg)
        try:
            async for frame in ws:
                reply = json.loads(frame)
                pending.pop(reply["id"]).set_result(str(frame))
        finally:
            await sub.unsubscribe()

    async with serve(handler, "127.0.0.1", port, compression=None, ping_interval=None):
        print(f"ready {port}", flush=True)
        await asyncio.Future()


async def agent(url: str) -> None:
    """Connect to the bridge and run each command with /bin/sh -c, replying with its output."""
    async with connect(url, compression=None, ping_interval=None) as ws:
        print("connected", flush=True)

        async def run(req: dict[str, str], ws: ClientConnection) -> None:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                req["command"],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
            await ws.send(
                json.dumps(
                    {
                        "id": req["id"],
                        "exit_code": proc.returncode,
                        "stdout": out.decode(),
                        "stderr": err.decode(),
                    }
                )
            )

        tasks: set[asyncio.Task[None]] = set()
        async for frame in ws:
            task = asyncio.create_task(run(json.loads(frame), ws))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


async def swarm(url: str, count: int) -> None:
    """Hold `count` idle connections to the bridge."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sem = asyncio.Semaphore(100)
    conns: list[ClientConnection] = []

    async def one() -> None:
        async with sem:
            conns.append(await connect(url, compression=None, ping_interval=None, open_timeout=60))

    await asyncio.gather(*(one() for _ in range(count)))
    print(f"swarm: {len(conns)} sessions established", flush=True)
    await asyncio.Future()


def main() -> None:
    """Dispatch on the role given on the command line."""
    role, *args = sys.argv[1:]
    if role == "bridge":
        asyncio.run(bridge(args[0], int(args[1]), args[2] if len(args) > 2 else None))
    elif role == "agent":
        asyncio.run(agent(args[0]))
    elif role == "swarm":
        asyncio.run(swarm(args[0], int(args[1])))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main()
