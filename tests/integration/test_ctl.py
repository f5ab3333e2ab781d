"""The operator CLI's REST commands as an operator runs them: the real `warlock` script (piped, so plain
and JSON output), against a real `warlock-api` process on a real nats-server, configured by the
environment or by a `warlock run`'s dev.json. SQLite only: the CLI sees HTTP, not the database."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from services.dev.procs import BIN
from tests.support.stack import Api, Stack

HOSTS = {
    "web1": {"role": "web", "dc": "a"},
    "web2": {"role": "web", "dc": "b"},
    "db1": {"role": "db", "dc": "a"},
}


def warlock(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the installed `warlock` script, stdout and stderr piped, with only `env` (and PATH/HOME)."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run(
        [str(BIN / "warlock"), *argv],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def api(stack: Stack, tmp_path: Path) -> Api:
    """A real API with three labelled hosts (no SSH check: no host needs to exist for a listing)."""
    api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    with httpx.Client(base_url=api.url, headers=api.auth, timeout=30) as http:
        for host, labels in HOSTS.items():
            address = f"10.9.0.{len(host)}{host[-1]}"
            added = http.post(
                "/api/hosts", json={"id": host, "address": address, "labels": labels, "ssh_check": False}
            )
            assert added.status_code == 201, added.text
    return api


def test_hosts_by_environment_piped_json_and_by_label(api: Api, stack: Stack, tmp_path: Path) -> None:
    env = {"WARLOCK_API_URL": api.url, "WARLOCK_API_KEY_FILE": str(stack.root / "api-key")}
    started = time.monotonic()
    done = warlock(["hosts"], tmp_path, env)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["host", "address", "labels", "agent"]
    assert [line.split()[0] for line in lines[1:]] == ["db1", "web1", "web2"]
    assert lines[2].split()[2:] == ["dc=a,role=web", "-"]  # no agent ever connected
    assert elapsed < 10, f"warlock hosts took {elapsed:.2f} s"

    done = warlock(["hosts", "--label", "role=web", "--json"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    listed = json.loads(done.stdout)
    assert sorted(h["id"] for h in listed) == ["web1", "web2"]
    assert {h["id"]: h["labels"] for h in listed} == {"web1": HOSTS["web1"], "web2": HOSTS["web2"]}

    done = warlock(["hosts", "-l", "role=web", "-l", "dc=b"], tmp_path, env)
    assert [line.split()[0] for line in done.stdout.splitlines()[1:]] == ["web2"]
    done = warlock(["hosts", "-l", "role=none"], tmp_path, env)
    assert (done.returncode, done.stdout.splitlines()) == (0, ["host  address  labels  agent"])


def test_hosts_from_dev_json(api: Api, stack: Stack, tmp_path: Path) -> None:
    """With no WARLOCK_API_URL, a `warlock run`'s .warlock/dev.json in the working directory says where."""
    cwd = tmp_path / "project"
    (cwd / ".warlock").mkdir(parents=True)
    (cwd / ".warlock" / "dev.json").write_text(
        json.dumps({"api_url": api.url, "api_key_file": str(stack.root / "api-key"), "nats_url": "nats://x"})
    )
    done = warlock(["hosts", "--json"], cwd, {})
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)) == 3


def test_a_refused_key_exits_2_and_an_absent_api_exits_3(api: Api, tmp_path: Path) -> None:
    done = warlock(["hosts"], tmp_path, {"WARLOCK_API_URL": api.url, "WARLOCK_API_KEY": "not-the-key"})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("warlock: the API refused the key (")
    assert len(done.stderr.splitlines()) == 1

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        done = warlock(["jobs"], tmp_path, {"WARLOCK_API_URL": url, "WARLOCK_API_KEY": "k"})
    assert (done.returncode, done.stdout) == (3, "")
    assert done.stderr.startswith(f"warlock: cannot reach the API at {url}: ConnectError: ")
    assert len(done.stderr.splitlines()) == 1

    done = warlock(["hosts"], tmp_path, {})
    assert done.returncode == 2
    assert "no API configured" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["hosts"],
        ["exec"],
        ["jobs"],
        ["job"],
        ["cancel"],
        ["keys"],
        ["keys", "list"],
        ["keys", "create"],
        ["keys", "revoke"],
    ],
    ids=" ".join,
)
def test_help_of_the_rest_commands(argv: list[str], tmp_path: Path) -> None:
    """`--help` prints plain usage and exits 0 without reading any configuration or writing a file."""
    done = warlock([*argv, "--help"], tmp_path, {})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: warlock {' '.join(argv)}")
    assert list(tmp_path.iterdir()) == []


async def test_exec_one_host_through_a_job(stack: Stack, tmp_path: Path) -> None:
    """`warlock exec` on a host with a real agent: the job's output and outcome, as JSON lines. Needs the
    API's jobs (POST /api/jobs)"""
    api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    gateway = stack.start_gateway()
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        box = {"id": "box", "address": "10.9.9.9", "labels": {"role": "web"}, "ssh_check": False}
        added = await http.post("/api/hosts", json=box)
        assert added.status_code == 201, added.text
    await stack.start_known_agent(api, "box", "box", [gateway.url])
    env = {"WARLOCK_API_URL": api.url, "WARLOCK_API_KEY_FILE": str(stack.root / "api-key")}
    done = warlock(
        ["exec", "echo a; sleep 1; echo b; exit 3", "box", "--timeout", "20", "--json"], tmp_path, env
    )
    assert done.returncode == 1, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[0]["event"] == "job"
    output = "".join(e["data"] for e in events if e["event"] == "output" and e["stream"] == "stdout")
    assert output == "a\nb\n"
    (host,) = [e for e in events if e["event"] == "host"]
    assert (host["host_id"], host["status"], host["exit_code"], host["via"]) == ("box", "failed", 3, "agent")
    assert events[-1]["event"] == "summary"
    assert events[-1]["exit_status"] == 1

    done = warlock(["exec", "true", "box"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith("1 hosts: 1 succeeded")

    # by label, one host without an agent (and no SSH worker): its outcome says why; exit 1
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        for host, labels in (("ghost", {"role": "web"}), ("db", {"role": "db"})):
            address = f"10.9.9.{len(host)}"
            added = await http.post(
                "/api/hosts", json={"id": host, "address": address, "labels": labels, "ssh_check": False}
            )
            assert added.status_code == 201, added.text
    done = warlock(["exec", "echo hi", "--label", "role=web"], tmp_path, env)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert "box: hi" in lines
    assert "box => succeeded (exit 0, via agent)" in lines
    (ghost,) = [ln for ln in lines if ln.startswith("ghost => ")]
    assert ghost.startswith("ghost => undeliverable (")
    assert not [ln for ln in lines if ln.startswith("db")]
    job_id = lines[0].split()[1]
    assert lines[-2] == f"job {job_id} finished: 2 hosts: 1 succeeded, 1 unreachable"
    assert lines[-1].split()[:2] == ["ghost", "undeliverable"]

    done = warlock(["jobs"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[1].split()[0] == job_id  # newest first
    done = warlock(["job", job_id, "--json"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert "ghost" in {o["host_id"] for o in json.loads(done.stdout)["outcomes"]}
    done = warlock(["job", "no-such-job"], tmp_path, env)
    assert (done.returncode, done.stdout) == (1, "")
    assert "unknown job" in done.stderr


def test_api_keys_over_rest(api: Api, stack: Stack, tmp_path: Path) -> None:
    """`warlock keys create|list|revoke` with the (admin) bootstrap key: the printed key works at once
    and within its scope only, and is refused after revoke."""
    env = {"WARLOCK_API_URL": api.url, "WARLOCK_API_KEY_FILE": str(stack.root / "api-key")}
    done = warlock(
        ["keys", "create", "web-reader", "--role", "read", "--scope", "role=web", "--expires", "1d"],
        tmp_path,
        env,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert len(done.stdout.splitlines()) == 1
    assert "role read, scope role=web, expires " in done.stderr
    assert key not in done.stderr

    scoped = {"WARLOCK_API_URL": api.url, "WARLOCK_API_KEY": key}
    done = warlock(["hosts", "--json"], tmp_path, scoped)
    assert done.returncode == 0, done.stderr
    assert sorted(h["id"] for h in json.loads(done.stdout)) == ["web1", "web2"]  # its scope only
    done = warlock(["keys", "list"], tmp_path, scoped)
    assert (done.returncode, done.stdout) == (1, "")  # keys are for admin keys: 403
    assert "(HTTP 403)" in done.stderr

    done = warlock(["keys", "list"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    (row,) = [line.split() for line in done.stdout.splitlines() if line.startswith("web-reader ")]
    assert row[1:3] == ["read", "role=web"]
    assert row[-1] == "active"
    done = warlock(["keys", "create", "web-reader"], tmp_path, env)
    assert (done.returncode, done.stdout) == (1, "")
    assert "(HTTP 409)" in done.stderr

    done = warlock(["keys", "revoke", "web-reader"], tmp_path, env)
    assert (done.returncode, done.stdout) == (0, "API key web-reader revoked\n")
    done = warlock(["hosts"], tmp_path, scoped)
    assert done.returncode == 2
    assert "the API refused the key" in done.stderr


async def test_cancel_a_running_command_of_a_detached_job(stack: Stack, tmp_path: Path) -> None:
    """`warlock exec --detach` prints the job id; `warlock cancel COMMAND_ID` kills the run (its outcome:
    cancelled); `warlock exec` then exits 1 on such a job."""
    api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    gateway = stack.start_gateway()
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        added = await http.post("/api/hosts", json={"id": "box", "address": "10.9.9.9", "ssh_check": False})
        assert added.status_code == 201, added.text
    await stack.start_known_agent(api, "box", "box", [gateway.url])
    env = {"WARLOCK_API_URL": api.url, "WARLOCK_API_KEY_FILE": str(stack.root / "api-key")}
    done = warlock(["exec", "sleep 60", "box", "--detach"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.strip()
    assert job_id.startswith("job-")
    done = warlock(["job", job_id, "--json"], tmp_path, env)
    (outcome,) = json.loads(done.stdout)["outcomes"]
    assert outcome["status"] in ("pending", "running"), outcome  # sent (the API says pending until the end)
    command_id = outcome["command_id"]
    await asyncio.sleep(1.5)  # the agent has started the sleep

    started = time.monotonic()
    done = warlock(["cancel", command_id], tmp_path, env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"command {command_id}: ")
    done = warlock(["exec", "true", "box", "-q"], tmp_path, env)  # the host is free again
    assert done.returncode == 0, done.stderr
    done = warlock(["job", job_id, "--json"], tmp_path, env)
    (outcome,) = json.loads(done.stdout)["outcomes"]
    assert outcome["status"] == "cancelled", outcome
    assert time.monotonic() - started < 30  # not the 60 s of the sleep
    done = warlock(["cancel", command_id], tmp_path, env)  # finished: the API says so (409)
    assert (done.returncode, done.stdout) == (1, "")
    assert "(HTTP 409)" in done.stderr


async def test_the_sse_client_follows_a_real_stream_and_resumes(stack: Stack, tmp_path: Path) -> None:
    """`client.Api.stream` (what `warlock exec` follows) on the API's real output stream of a command on
    a real agent: the first chunk of `echo a; sleep 2; echo b` within 1 s of the request and 2 s before
    the second, then the end; a stream resumed after the first event has no gap and no duplicate. Needs
    /api/commands/{id}/stream."""
    from services.ctl import client

    api = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    gateway = stack.start_gateway()
    async with httpx.AsyncClient(base_url=api.url, headers=api.auth, timeout=30) as http:
        added = await http.post("/api/hosts", json={"id": "box", "address": "10.9.9.9", "ssh_check": False})
        assert added.status_code == 201, added.text
        await stack.start_known_agent(api, "box", "box", [gateway.url])
        sent = time.monotonic()
        running = asyncio.create_task(
            http.post("/api/hosts/box/exec", json={"command": "echo a; sleep 2; echo b", "timeout": 20})
        )
        command_id = None
        while command_id is None:
            listed = (await http.get("/api/hosts/box/commands")).json()
            command_id = listed[0]["command_id"] if listed else None
            await asyncio.sleep(0.02)
        config = client.ApiConfig(api.url, api.key, "test")
        seen: list[tuple[float, client.StreamEvent]] = []
        async with client.Api(config) as rest:
            async for event in rest.stream(command_id):
                seen.append((time.monotonic() - sent, event))
            chunks = [e for _, e in seen if not e.final]
            assert "".join(e.data for e in chunks) == "a\nb\n"
            assert seen[0][0] < 1.0, seen  # "a" as it happened (0.22 s here), 2 s before "b": streamed
            assert seen[1][0] - seen[0][0] > 1.5, seen
            assert seen[-1][1].final
            assert seen[-1][1].outcome is not None
            assert seen[-1][1].outcome["status"] == "succeeded"
            resumed = [e async for e in rest.stream(command_id, chunks[0].id)]
        assert [e.data for e in resumed if not e.final] == [e.data for e in chunks[1:]]
        assert resumed[-1].final
        assert (await running).status_code == 200
