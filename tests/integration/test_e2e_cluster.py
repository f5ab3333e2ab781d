"""End to end: `warlock run --cluster` (what `make cluster` calls) starts every part, each API reaches the
agent, Ctrl-C stops every pid, and an unusable database is one clear line.

The launcher runs as a subprocess with its own state directory, free ports and a fresh PostgreSQL database
(`tests.support.cluster`), exactly as a user starts it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from services.dev.files import ensure_route_tls
from services.dev.procs import BIN
from shared.natsauth import Cluster, TlsFiles, write_server_config
from tests.support.cluster import HOST, cluster_run, pid_alive

pytestmark = pytest.mark.e2e

PARTS = {"nats-1", "nats-2", "nats-3", "api-1", "api-2", "fallback-ssh", "gateway-1", "gateway-2", "agent"}


def _nats_ok(api_url: str) -> bool:
    """Whether the API's /healthz says its NATS link is up (503 while it reconnects)."""
    try:
        with urllib.request.urlopen(f"{api_url}/healthz", timeout=5) as answer:
            return bool(json.loads(answer.read()).get("nats") == "ok")
    except urllib.error.HTTPError:
        return False


def _routes(monitor_url: str) -> set[str]:
    with urllib.request.urlopen(f"{monitor_url}/routez", timeout=5) as answer:
        return {r["remote_name"] for r in json.loads(answer.read())["routes"]}


async def test_cluster_starts_every_part_each_api_reaches_the_agent_and_ctrl_c_stops_all(
    tmp_path: Path,
) -> None:
    """Every part in dev.json with a live pid; the nodes routed to each other and a node with a certificate
    of another CA refused; a command through each API runs on the agent; SIGINT stops every pid."""
    async with cluster_run(tmp_path, WARLOCK_LOG_FORMAT="json") as run:  # every part logs JSON lines
        info = run.info
        assert {p["name"] for p in info["parts"]} == PARTS
        assert all(pid_alive(pid) for pid in run.pids()), info["parts"]
        assert len(set(run.pids())) == len(PARTS)
        assert len(set(info["api_urls"])) == len(info["api_urls"]) == 2
        assert len(set(info["gateway_urls"])) == len(info["gateway_urls"]) == 2
        assert len(set(info["nats_urls"])) == len(info["nats_urls"]) == 3
        assert info["api_url"] == info["api_urls"][0]  # the single-node keys are kept
        agent_conf = (run.state / "agent.conf").read_text()
        assert all(json.dumps(url) in agent_conf for url in info["gateway_urls"])
        for part in info["parts"]:
            assert Path(part["log"]).exists(), part
            assert str(part["pid"]) in run.log(), part  # the banner lists it
        nodes = [run.part(f"nats-{i}") for i in (1, 2, 3)]
        for node in nodes:
            assert _routes(node["monitor_url"]) == {n["name"] for n in nodes} - {node["name"]}

        # a node whose route certificate another CA signed cannot join, although it trusts the cluster's
        # CA: the accepting node verifies the dialling node's certificate too
        intruder_dir = tmp_path / "intruder"
        intruder_tls = ensure_route_tls(intruder_dir / "tls")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            route_port = s.getsockname()[1]
        conf = intruder_dir / "nats.conf"
        write_server_config(
            conf,
            intruder_dir / "nats",
            host="127.0.0.1",
            port=-1,  # any free port
            cluster=Cluster(
                "warlock-dev",
                "intruder",
                route_port,
                (f"nats-route://127.0.0.1:{nodes[0]['route_port']}",),
                listen="127.0.0.1",
                # it trusts the cluster's CA, so only the cluster's check of its certificate can refuse it
                tls=TlsFiles(str(intruder_tls.cert_file), str(intruder_tls.key_file), info["ca_file"]),
            ),
        )
        intruder_log = (tmp_path / "intruder.log").open("wb")
        intruder = subprocess.Popen(
            [str(BIN / "nats-server"), "-c", str(conf)], stdout=intruder_log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 10
            node_log = Path(nodes[0]["log"])
            while "failed to verify certificate" not in node_log.read_text():  # nats-1 refused it
                assert intruder.poll() is None, (tmp_path / "intruder.log").read_text()
                assert time.monotonic() < deadline, (tmp_path / "intruder.log").read_text()
                time.sleep(0.1)
            assert "intruder" not in _routes(nodes[0]["monitor_url"])
        finally:
            intruder.terminate()
            intruder.wait(10)
            intruder_log.close()

        for api_url in info["api_urls"]:
            answer = await run.exec(api_url, f"echo via {api_url}")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["via"], body["status"], body["stdout"]) == ("agent", "succeeded", f"via {api_url}\n")

        # `warlock req` takes dev.json's nats_url, every node: it still gets through with nats-1 gone
        assert info["nats_url"].split(",") == info["nats_urls"]
        os.kill(nodes[0]["pid"], signal.SIGKILL)
        cwd = tmp_path / "operator"
        cwd.mkdir()
        (cwd / ".warlock").symlink_to(run.state)

        def req_(subject: str, body: str) -> subprocess.CompletedProcess[str]:
            argv = [str(BIN / "warlock"), "req", subject, body]
            return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)

        # the services that were on nats-1 reconnect elsewhere first (a ping, which runs nothing, reaches the
        # gateway holding the agent; /healthz says each API's NATS link is up), then one exec, never retried
        deadline = time.monotonic() + 20
        while "agent_rtt_ms" not in (ping := req_(f"warlock.agent.{HOST}.ping", "")).stdout:
            assert time.monotonic() < deadline, (ping.stdout, ping.stderr)
            time.sleep(0.2)
        for api_url in info["api_urls"]:  # and both APIs are back on NATS
            while not _nats_ok(api_url):
                assert time.monotonic() < deadline, api_url
                time.sleep(0.2)
        req = req_(f"warlock.ops.{HOST}.exec", '{"command": "echo by req"}')
        assert req.returncode == 0, req.stderr
        assert json.loads(req.stdout)["stdout"] == "by req\n", req.stdout

        pids = run.pids()
        assert run.stop(signal.SIGINT) == 0, run.log()
        deadline = time.monotonic() + 5
        while alive := [pid for pid in pids if pid_alive(pid)]:
            assert time.monotonic() < deadline, f"still running after Ctrl-C: {alive}"
            time.sleep(0.1)
        assert not (run.state / "dev.json").exists()


def test_cluster_without_a_reachable_database_says_so_in_one_line(tmp_path: Path) -> None:
    """WARLOCK_DATABASE_URL on a closed port: exit 1, one line naming WARLOCK_DATABASE_URL, no traceback,
    nothing started."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    env = {
        "WARLOCK_DEV_DIR": str(tmp_path / "state"),
        "WARLOCK_DATABASE_URL": f"postgresql://postgres:sekrit@127.0.0.1:{closed}/warlock",
        "PATH": str(BIN),
    }
    started = time.monotonic()
    done = subprocess.run(
        [str(BIN / "warlock"), "run", "--cluster"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done
    assert time.monotonic() - started < 30
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(
        "warlock: cannot use PostgreSQL at postgresql+asyncpg://postgres:***@127.0.0.1:"
    )
    assert "WARLOCK_DATABASE_URL" in errors[0]
    assert "sekrit" not in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "state" / "logs").exists()  # nothing was started

    bad = subprocess.run(
        [str(BIN / "warlock"), "run", "--cluster"],
        env={**env, "WARLOCK_DATABASE_URL": "sqlite+aiosqlite:///x.db"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "must name a PostgreSQL database" in bad.stderr
    assert "Traceback" not in bad.stderr
