"""`make bench`: Warlock's command paths and memory beside raw-library baselines, in one run.

1. Exec round trip of `true`: NATS request → gateway → agent → /bin/sh, against the same chain built
   from nats-py + websockets + asyncio subprocess with no Warlock code (bench/raw_chain.py). Blocks of
   requests alternate between the two so machine noise hits both alike; p50/p99 and the ratio.
2. Memory per idle agent on one gateway at 1,000 and 5,000 simulated agents (`warlock swarm`),
   against the raw bridge holding the same number of websockets with one NATS subscription each.
3. REST exec of `true` via agent and via the SSH worker's pooled connection, beside the raw chain and raw
   asyncssh on a pooled and on a fresh connection per command (bench/rest.py): with the API on SQLite,
   then again on PostgreSQL (127.0.0.1:5432; skipped if unreachable, or with --no-postgresql).
   Before them, the sign and verify cost per command (bench/signing_cost.py).
4. The agent's own RSS, idle and after ten 1 MiB-output commands (with its ledger file's size), beside
   the bare interpreter's and `import pydantic`'s (bench/agent_memory.py).

5. Fleet scale (bench/storm.py; the API on PostgreSQL as the token authority): a connect storm of
   10,000 swarm agents on one gateway (time, agents/s, CPU seconds of the API and of the gateway), the
   gateway's RSS with those 10,000 agents idle, and the failover time of 1,000 agents after their
   gateway is SIGKILLed.
6. Job fan-out of `true` to 1,000 swarm agents on one gateway and 10,000 across two, every outcome recorded,
   beside one exec request per host straight over NATS in the same run; the API's RSS; then a job to 20
   real agents beside raw asyncssh to the same 20 hosts, fresh and pooled connections (bench/fanout.py).

7. Metrics ingest (bench/metrics_ingest.py): samples of 2,000 hosts published on NATS as gateways publish
   them, stored by the API in the metrics history on PostgreSQL: samples/s end to end, none lost (counted
   in the table), the API's CPU seconds.
8. Browser stream (bench/browser_stream.py): 2,000 metrics events/s to 10 browsers on /api/ws, every one
   delivered to every browser, delivery latency beside a raw NATS subscriber's, the API's CPU.
9. The dashboard's host list (bench/fleet_list.py): GET /api/fleet at 1,000 and 10,000 hosts with a metrics
   history, beside GET /api/hosts and GET /api/agents.

`--only BLOCK ...` runs some blocks only (latency, gateway-memory, rest, agent-memory, storm, gateway-rss,
failover, fanout, metrics-ingest, browser-stream, fleet-list).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from bench.agent_memory import agent_memory, print_agent_memory
from bench.browser_stream import browser_stream, print_browser_stream
from bench.common import RAW, RAW_SUBJECT, TRUE, pct, start_raw_chain, timed_requests
from bench.fanout import fanout, print_fanout, print_real_agents, real_agents
from bench.fleet_list import fleet_list, print_fleet_list
from bench.metrics_ingest import metrics_ingest, print_metrics_ingest
from bench.rest import FRESH_SSH, REST_AGENT, REST_AGENT_HTTPX, REST_RAW, REST_SSH, rest_latency
from bench.signing_cost import print_signing_cost
from bench.storm import connect_storm, failover, print_failover, print_rss, print_storm
from services.dev.procs import BIN, Proc, free_port, rss_kib
from shared import signing
from shared.protocol import ExecResult, decode_model
from shared.tokens import generate_token
from tests.support.db import PG_HOST, PG_PORT, create_pg_database, drop_pg_database, pg_url
from tests.support.natsserver import NatsServer
from tests.support.stack import Stack
from tests.support.trust import TestSigner


def latency(root: Path, rounds: int, block: int) -> dict[str, list[float]]:
    """Alternate blocks of `true` round trips through the raw chain and through Warlock.

    Warlock's requests are signed as the API signs them (a fresh command id each: the agent refuses a
    replay), and each result's agent signature is verified, both inside the timed span."""
    server = NatsServer(root, "nats-latency")
    stack = Stack(root, server.url)
    signer = TestSigner(root)  # the key the stack's agents trust
    identity = root / "bench-agent-identity.key"
    agent_public = signing.ensure_private(identity)[0].verify_key

    def signed() -> bytes:
        return signer.exec_body("bench", TRUE)

    def verified(data: bytes) -> None:
        if not signing.verify_result(agent_public, "bench", decode_model(ExecResult, data)):
            raise RuntimeError(f"the agent's result does not verify: {data[:200]!r}")

    try:
        start_raw_chain(stack, server.url)
        stack.start_authority()
        gw = stack.start_gateway("bench-gw")
        token = stack.add_host("bench")
        stack.start_agent("bench-agent", "bench", token, [gw.url], identity_key_file=str(identity))
        results: dict[str, list[float]] = {"raw": [], "warlock": []}
        warlock = "warlock.agent.bench.exec"
        asyncio.run(timed_requests(server.url, RAW_SUBJECT, TRUE, 50))  # warm up
        asyncio.run(timed_requests(server.url, warlock, signed, 50, verified))
        for _ in range(rounds):
            results["raw"] += asyncio.run(timed_requests(server.url, RAW_SUBJECT, TRUE, block))
            results["warlock"] += asyncio.run(timed_requests(server.url, warlock, signed, block, verified))
        return results
    finally:
        stack.close()
        server.stop()


def _settle_rss(pid: int, seconds: float = 3.0) -> int:
    time.sleep(seconds)
    return rss_kib(pid)


def memory_warlock(root: Path, count: int) -> float:
    """KiB of gateway RSS per idle swarm agent at `count` agents."""
    server = NatsServer(root, f"nats-mem-{count}")
    stack = Stack(root, server.url)
    try:
        stack.start_authority()
        gw = stack.start_gateway(f"mem-gw-{count}")
        tokens = stack.add_hosts({f"swarm-{i:05d}": generate_token() for i in range(count)})
        tokens_file = root / f"swarm-{count}.json"
        tokens_file.write_text(json.dumps(tokens))
        before = _settle_rss(gw.proc.pid, 1.0)
        swarm = stack.start(
            f"swarm-{count}",
            [str(BIN / "warlock"), "swarm", "--gateway", gw.url, "--tokens", str(tokens_file)],
            stack.env(),
        )
        swarm.wait_for(rf"swarm: {count} sessions established", timeout=300)
        after = _settle_rss(gw.proc.pid)
        return (after - before) / count
    finally:
        stack.close()
        server.stop()


def memory_raw(root: Path, count: int) -> float:
    """KiB of raw-bridge RSS per idle websocket (with one NATS subscription) at `count` connections."""
    server = NatsServer(root, f"nats-raw-{count}")
    procs: list[Proc] = []
    try:
        port = free_port()
        nkey = str(server.nkey_file("gateway"))
        bridge = Proc(f"raw-bridge-{count}", [*RAW, "bridge", server.url, str(port), nkey], root)
        procs.append(bridge)
        bridge.wait_for("ready")
        before = _settle_rss(bridge.pid, 1.0)
        swarm = Proc(f"raw-swarm-{count}", [*RAW, "swarm", f"ws://127.0.0.1:{port}", str(count)], root)
        procs.append(swarm)
        swarm.wait_for(rf"swarm: {count} sessions established", timeout=300)
        after = _settle_rss(bridge.pid)
        return (after - before) / count
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()


BLOCKS = ("latency", "gateway-memory", "rest", "agent-memory", "storm", "gateway-rss", "failover", "fanout")
BLOCKS_MORE = ("metrics-ingest", "browser-stream", "fleet-list")


def main() -> None:
    """Run the benchmark and print a Markdown table with ratios."""
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks per chain")
    parser.add_argument("--block", type=int, default=200, help="requests per block")
    parser.add_argument("--agents", type=int, nargs="*", default=[1000, 5000])
    parser.add_argument("--rest-rounds", type=int, default=5, help="alternating blocks of REST requests")
    parser.add_argument("--rest-block", type=int, default=100, help="REST requests per block")
    parser.add_argument(
        "--no-postgresql",
        dest="postgresql",
        action="store_false",
        help="skip the REST rows with the API on PostgreSQL (127.0.0.1:5432)",
    )
    parser.add_argument("--storm-agents", type=int, default=10_000, help="agents in the connect storm")
    parser.add_argument("--storm-concurrency", type=int, default=500, help="swarm connects in flight")
    parser.add_argument("--failover-agents", type=int, default=1_000, help="agents moved by the failover")
    parser.add_argument("--fleet-runs", type=int, default=3, help="storms and failovers, each (median)")
    parser.add_argument("--fanout-runs", type=int, default=3, help="fan-out jobs per size (median)")
    parser.add_argument(
        "--fanout-agents", type=int, nargs=2, default=[1000, 10000], help="fan-out sizes: one gateway, two"
    )
    parser.add_argument("--metrics-hosts", type=int, default=2000, help="hosts sending metrics samples")
    parser.add_argument("--metrics-rounds", type=int, default=25, help="samples per host and run")
    parser.add_argument("--metrics-runs", type=int, default=3, help="metrics ingest runs (median)")
    parser.add_argument("--browsers", type=int, default=10, help="browsers on /api/ws (browser-stream)")
    parser.add_argument("--browser-rate", type=int, default=2000, help="metrics events/s (browser-stream)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=BLOCKS + BLOCKS_MORE,
        default=list(BLOCKS + BLOCKS_MORE),
        help="blocks to run",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warlock-bench-") as tmp:
        root = Path(tmp)
        if "latency" in args.only or "rest" in args.only:
            print_signing_cost()
        if "latency" in args.only:
            _latency_block(root, args.rounds, args.block)
        if "gateway-memory" in args.only:
            _gateway_memory_block(root, args.agents)
        if "rest" in args.only:
            _rest_block(root, args.rest_rounds, args.rest_block, args.postgresql)
        if "agent-memory" in args.only:
            print_agent_memory(agent_memory(root))
        _fleet_blocks(root, args)
        if "fanout" in args.only:
            small, large = args.fanout_agents
            print_fanout(fanout(root / "fanout", small, large, args.fanout_runs))
            print_real_agents(real_agents(root / "real-agents"))
        if "metrics-ingest" in args.only:
            ingest = metrics_ingest(
                root / "metrics", args.metrics_hosts, args.metrics_rounds, args.metrics_runs
            )
            print_metrics_ingest(ingest, args.metrics_hosts)
        if "browser-stream" in args.only:
            runs = browser_stream(root / "browsers", browsers=args.browsers, rate=args.browser_rate)
            print_browser_stream(runs, args.browsers, args.browser_rate)
        if "fleet-list" in args.only:
            print_fleet_list(fleet_list(root / "fleet-list"))


def _fleet_blocks(root: Path, args: argparse.Namespace) -> None:
    """The storm and the gateway RSS (one storm serves both), then the failover."""
    if "storm" in args.only or "gateway-rss" in args.only:
        storms = connect_storm(root / "storm", args.storm_agents, args.storm_concurrency, args.fleet_runs)
        if "storm" in args.only:
            print_storm(storms)
        if "gateway-rss" in args.only:
            print_rss(storms)
    if "failover" in args.only:
        count = args.failover_agents
        print_failover(failover(root / "failover", count, args.storm_concurrency, args.fleet_runs), count)


def _latency_block(root: Path, rounds: int, block: int) -> None:
    """Exec round trip of `true`, Warlock against the raw chain."""
    lat = latency(root, rounds, block)
    raw50, raw99 = pct(lat["raw"], 0.5), pct(lat["raw"], 0.99)
    w50, w99 = pct(lat["warlock"], 0.5), pct(lat["warlock"], 0.99)
    print(f"\n## Exec round trip of `true` ({len(lat['warlock'])} requests each, alternating blocks)\n")
    print("| chain | p50 ms | p99 ms | mean ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, key in (("raw nats-py + websockets + subprocess", "raw"), ("Warlock", "warlock")):
        values = lat[key]
        p50, p99, mean = pct(values, 0.5), pct(values, 0.99), statistics.mean(values)
        print(f"| {label} | {p50:.2f} | {p99:.2f} | {mean:.2f} |")
    print(f"\np50 ratio Warlock / raw: **{w50 / raw50:.2f}×** (target ≤ 1.5×); p99 ratio {w99 / raw99:.2f}×")


def _gateway_memory_block(root: Path, counts: list[int]) -> None:
    """Gateway RSS per idle agent against the raw bridge."""
    print("\n## Gateway memory per idle agent\n")
    print("| agents | Warlock gateway KiB/agent | raw bridge KiB/conn | ratio |")
    print("| ---: | ---: | ---: | ---: |")
    for count in counts:
        w = memory_warlock(root, count)
        r = memory_raw(root, count)
        print(f"| {count} | {w:.1f} | {r:.1f} | {w / r:.2f}× |", flush=True)
    print("\nTarget: ≤ 25 KiB per idle agent.")


def _rest_block(root: Path, rounds: int, block: int, postgresql: bool) -> None:
    """REST exec rows on SQLite, then on PostgreSQL unless skipped."""
    sqlite_url = f"sqlite+aiosqlite:///{root / 'rest.db'}"
    rest = rest_latency(root / "rest-sqlite", rounds, block, sqlite_url)
    print("\n## REST exec of `true`, API on SQLite (alternating blocks; SSH account with /bin/sh)\n")
    _rest_table(rest)
    raw50 = pct(rest[REST_RAW], 0.5)
    agent50 = pct(rest[REST_AGENT], 0.5)
    httpx50 = pct(rest[REST_AGENT_HTTPX], 0.5)
    pooled50 = pct(rest[REST_SSH], 0.5)
    fresh50 = pct(rest[FRESH_SSH], 0.5)
    print(f"\nREST → agent p50 / raw chain p50: **{agent50 / raw50:.2f}×** (target ≤ 2×;", end=" ")
    print(f"with the httpx client {httpx50 / raw50:.2f}×)")
    ssh_ratio = fresh50 / agent50
    print(f"fresh SSH per command p50 / REST → agent p50: **{ssh_ratio:.1f}×** (target ≥ 50×;", end=" ")
    print(f"the raw chain alone: {fresh50 / raw50:.1f}×)")
    print(f"REST → SSH worker p50 / REST → agent p50: **{pooled50 / agent50:.2f}×** (target ≥ 1×)")
    if postgresql:
        _rest_postgresql(root, rounds, block)


def _rest_table(rest: dict[str, list[float]]) -> None:
    print("| path | n | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for label, values in rest.items():
        print(f"| {label} | {len(values)} | {pct(values, 0.5):.2f} | {pct(values, 0.99):.2f} |", flush=True)


def _rest_postgresql(root: Path, rounds: int, block: int) -> None:
    """The REST rows again with the API on a fresh PostgreSQL database (127.0.0.1:5432), if reachable."""
    print("\n## REST exec of `true`, API on PostgreSQL\n")
    try:
        name = asyncio.run(create_pg_database())
    except (OSError, SQLAlchemyError) as exc:
        print(f"skipped: PostgreSQL on {PG_HOST}:{PG_PORT} not reachable ({type(exc).__name__})")
        return
    try:
        rest = rest_latency(root / "rest-postgresql", rounds, block, pg_url(name))
    finally:
        asyncio.run(drop_pg_database(name))
    _rest_table(rest)
    raw50, agent50 = pct(rest[REST_RAW], 0.5), pct(rest[REST_AGENT], 0.5)
    print(f"\nREST → agent p50 / raw chain p50: **{agent50 / raw50:.2f}×** (every commit durable)")


if __name__ == "__main__":
    main()
