"""The operator CLI's REST commands (`warlock hosts|exec|jobs|job|cancel|keys`) against a fake API
(httpx.MockTransport speaking the contract of issue 11): what they print, piped and as JSON, how they
follow a job's output stream, and their exit statuses."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from rich.console import Console

from services.ctl import cli, client, ops, render

KEY = "k" * 64


class FakeApi:
    """The API of issue 11 in memory. A job's hosts finish one poll after another (`steps`); the output
    stream of a command replays `chunks` and ends with the outcome."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.hosts: list[dict[str, Any]] = [
            {"id": "web1", "address": "10.0.0.1", "labels": {"role": "web"}},
            {"id": "web2", "address": "10.0.0.2", "labels": {"role": "web", "dc": "b"}},
            {"id": "db1", "address": "10.0.0.3", "labels": {"role": "db"}},
        ]
        self.outcomes: dict[str, dict[str, Any]] = {}  # host → final entry
        self.output: dict[str, dict[str, str]] = {}  # host → stdout/stderr
        self.polls = 0
        self.stream_status = 200
        self.break_stream_once: set[str] = set()  # hosts whose first stream breaks after one chunk
        self.ignore_label_query = False
        self.cancelled = False  # the job's state says cancelled at once; its runs in flight finish later
        self.limited: set[str] = set()  # paths answered 429 once

    # ------------------------------------------------------------------ scripting
    def outcome(self, host: str, status: str, stdout: str = "", stderr: str = "", **extra: Any) -> None:
        self.outcomes[host] = {
            "host_id": host,
            "command_id": f"c-{host}",
            "status": status,
            "via": extra.pop("via", "agent"),
            "exit_code": extra.pop("exit_code", 0 if status == "succeeded" else None),
            "error_code": extra.pop("error_code", None),
            "error_description": extra.pop("error_description", None),
        }
        self.output[host] = {"stdout": stdout, "stderr": stderr}

    def job(self) -> dict[str, Any]:
        """Every host runs at the first poll; host i is final from poll i+2 on; the job ends when all are."""
        entries = []
        for i, (_host, final) in enumerate(self.outcomes.items()):
            if self.polls > i + 1:
                entries.append(final)
            else:
                entries.append({**final, "status": "running", "exit_code": None, "error_code": None})
        counts = dict.fromkeys(render.COUNT_KEYS, 0)
        for e in entries:
            key = {"running": "pending", "undeliverable": "unreachable"}.get(e["status"], e["status"])
            counts[key] = counts.get(key, 0) + 1
        done = all(e["status"] != "running" for e in entries)
        state = "cancelled" if self.cancelled else "finished" if done else "running"
        return {
            "job_id": "j1",
            "state": state,
            "targets": len(entries),
            "counts": counts,
            "outcomes": entries,
        }

    # ------------------------------------------------------------------ HTTP
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {KEY}":
            return httpx.Response(401, json={"detail": "invalid API key"})
        path, method = request.url.path, request.method
        if path in self.limited:
            self.limited.discard(path)
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"detail": "rate limited"})
        if path == "/api/hosts" and method == "GET":
            wanted = {k: v for k, _, v in (p.partition("=") for p in request.url.params.get_list("label"))}
            if self.ignore_label_query:
                wanted = {}
            found = [h for h in self.hosts if all(h["labels"].get(k) == v for k, v in wanted.items())]
            return httpx.Response(200, json=found)
        if path == "/api/agents":
            return httpx.Response(200, json=[{"host_id": "web1", "status": "connected"}])
        if path == "/api/jobs" and method == "POST":
            body = json.loads(request.content)
            return httpx.Response(202, json={"job_id": "j1", "state": "pending", "echo": body})
        if path == "/api/jobs" and method == "GET":
            return httpx.Response(
                200, json=[{**self.job(), "command": "uptime", "created_at": "2026-12-01T12:00:00Z"}]
            )
        if path == "/api/jobs/j1":
            offset = int(request.url.params.get("offset", "0"))
            if offset == 0:
                self.polls += 1
            job = self.job()
            limit = int(request.url.params.get("limit", "10000"))
            return httpx.Response(200, json={**job, "outcomes": job["outcomes"][offset : offset + limit]})
        if path.startswith("/api/jobs/") and path.endswith("/cancel"):
            return httpx.Response(202, json={"job_id": path.split("/")[3], "state": "cancelling"})
        if path.startswith("/api/commands/") and path.endswith("/cancel"):
            cid = path.split("/")[3]
            if cid == "gone":
                return httpx.Response(404, json={"detail": "unknown command gone"})
            return httpx.Response(202, json={"command_id": cid, "status": "cancelled"})
        if path.startswith("/api/commands/") and path.endswith("/stream"):
            return self.stream(request, path.split("/")[3])
        if path.startswith("/api/commands/"):
            host = path.split("/")[3].removeprefix("c-")
            return httpx.Response(200, json={**self.outcomes[host], **self.output[host], "truncated": False})
        if path == "/api/keys" and method == "GET":
            return httpx.Response(
                200,
                json=[
                    {
                        "name": "ci",
                        "role": "operate",
                        "scope": {"role": "web"},
                        "expires_at": None,
                        "state": "active",
                    }
                ],
            )
        if path == "/api/keys" and method == "POST":
            body = json.loads(request.content)
            if body["name"] == "taken":
                return httpx.Response(409, json={"detail": "API key taken exists"})
            return httpx.Response(201, json={**body, "key": "secret-key-shown-once"})
        if path.startswith("/api/keys/") and method == "DELETE":
            return httpx.Response(204)
        return httpx.Response(404, json={"detail": "Not Found"})

    def stream(self, request: httpx.Request, command_id: str) -> httpx.Response:
        if self.stream_status != 200:
            return httpx.Response(self.stream_status, json={"detail": "Not Found"})
        host = command_id.removeprefix("c-")
        events = []
        seq = 0
        for name in ("stdout", "stderr"):
            for piece in _pieces(self.output[host][name]):
                seq += 1
                events.append((seq, f"id: {seq}\ndata: {json.dumps({'stream': name, 'data': piece})}\n\n"))
        events.append((seq + 1, f"id: {seq + 1}\nevent: end\ndata: {json.dumps(self.outcomes[host])}\n\n"))
        after = int(request.headers.get("last-event-id", "0"))
        todo = [text for n, text in events if n > after]
        breaks = host in self.break_stream_once
        self.break_stream_once.discard(host)

        async def body() -> AsyncIterator[bytes]:
            yield b": keep-alive\n\n"
            for i, text in enumerate(todo):
                if breaks and i == 1:
                    raise httpx.ReadError("connection reset")
                yield text.encode()

        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())


def _pieces(text: str) -> list[str]:
    """Chunks that do not respect line ends: the CLI must put lines back together."""
    return [text[i : i + 3] for i in range(0, len(text), 3)]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeApi:
    fake = FakeApi()
    monkeypatch.setattr(ops, "TRANSPORT", fake.transport())
    monkeypatch.setattr(ops, "POLL_S", 0.0)
    monkeypatch.setenv("WARLOCK_API_URL", "http://api.test")
    monkeypatch.setenv("WARLOCK_API_KEY", KEY)
    monkeypatch.delenv("WARLOCK_API_KEY_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    return fake


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- configuration


def test_config_from_the_environment_key_or_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    by_key = client.resolve_config({"WARLOCK_API_URL": "http://a:8000/", "WARLOCK_API_KEY": KEY})
    assert (by_key.url, by_key.key, by_key.source) == ("http://a:8000", KEY, "environment")
    by_file = client.resolve_config({"WARLOCK_API_URL": "https://a", "WARLOCK_API_KEY_FILE": str(key_file)})
    assert by_file.key == KEY
    assert KEY not in repr(by_file)
    with pytest.raises(client.ConfigError, match="WARLOCK_API_KEY_FILE"):
        client.resolve_config({"WARLOCK_API_URL": "http://a"})
    with pytest.raises(client.ConfigError, match="cannot read the API key file"):
        client.resolve_config({"WARLOCK_API_URL": "http://a", "WARLOCK_API_KEY_FILE": str(tmp_path / "nope")})
    with pytest.raises(client.ConfigError, match="not an http"):
        client.resolve_config({"WARLOCK_API_URL": "a:8000", "WARLOCK_API_KEY": KEY})


def test_config_from_dev_json_never_sends_its_key_elsewhere(tmp_path: Path) -> None:
    """dev.json pairs its URL with its key; WARLOCK_API_URL without a key of its own is an error, not
    dev.json's key sent to another server."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "api-key").write_text(KEY)
    (state / "dev.json").write_text(
        json.dumps({"api_url": "http://127.0.0.1:9", "api_key_file": str(state / "api-key")})
    )
    env = {"WARLOCK_DEV_DIR": str(state)}
    found = client.resolve_config(env)
    assert (found.url, found.key, found.source) == ("http://127.0.0.1:9", KEY, str(state / "dev.json"))
    with pytest.raises(client.ConfigError, match="no key"):
        client.resolve_config({**env, "WARLOCK_API_URL": "http://elsewhere"})
    with pytest.raises(client.ConfigError, match="warlock run"):
        client.resolve_config({"WARLOCK_DEV_DIR": str(tmp_path / "empty")})
    (state / "dev.json").write_text("{")
    with pytest.raises(client.ConfigError, match="cannot read"):
        client.resolve_config(env)


def test_no_api_configured_exits_2_with_what_to_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("WARLOCK_API_URL", "WARLOCK_API_KEY", "WARLOCK_API_KEY_FILE", "WARLOCK_DEV_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(["hosts"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("warlock: no API configured: set WARLOCK_API_URL")


# ----------------------------------------------------------------------------- SSE parsing


def test_parse_event() -> None:
    chunk = client.parse_event("3", None, '{"stream": "stdout", "data": "a\\n"}')
    assert chunk == client.StreamEvent("3", stream="stdout", data="a\n")
    end = client.parse_event("4", "end", '{"status": "succeeded", "exit_code": 0}')
    assert end is not None
    assert end.final
    assert end.outcome == {"status": "succeeded", "exit_code": 0}
    by_body = client.parse_event("5", None, '{"status": "failed"}')
    assert by_body is not None
    assert by_body.final
    assert client.parse_event(None, None, "not json") is None
    assert client.parse_event(None, "ping", "") is None


# ----------------------------------------------------------------------------- hosts


def test_hosts_piped_table_json_and_label_filter(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["hosts"], capsys)
    assert code == 0
    assert out.splitlines() == [
        "host  address   labels         agent",
        "db1   10.0.0.3  role=db        -",
        "web1  10.0.0.1  role=web       connected",
        "web2  10.0.0.2  dc=b,role=web  -",
    ]
    code, out, _ = _run(["hosts", "--label", "role=web", "-l", "dc=b", "--json"], capsys)
    assert code == 0
    assert [h["id"] for h in json.loads(out)] == ["web2"]
    assert api.requests[-2].url.params.get_list("label") == ["role=web", "dc=b"]
    api.ignore_label_query = True  # an API that ignores ?label= must not widen the selection
    code, out, _ = _run(["hosts", "--label", "role=db", "--json"], capsys)
    assert [h["id"] for h in json.loads(out)] == ["db1"]


def test_hosts_by_label_presence_and_a_bad_label(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    """``--label dc`` asks for hosts that have the label at all; ``--label =x`` is a usage error."""
    code, out, _ = _run(["hosts", "--label", "dc", "--json"], capsys)
    assert code == 0
    assert api.requests[0].url.params.get_list("label") == ["dc"]
    api.ignore_label_query = True
    code, out, _ = _run(["hosts", "--label", "dc", "--json"], capsys)
    assert [h["id"] for h in json.loads(out)] == ["web2"]
    sent = len(api.requests)
    code, out, err = _run(["hosts", "--label", "=x"], capsys)
    assert (code, out) == (2, "")
    assert "'=x' is not KEY=VALUE or KEY" in err
    assert len(api.requests) == sent
    code, out, err = _run(["exec", "true", "--label", "dc"], capsys)  # a job's labels are KEY=VALUE
    assert (code, out) == (2, "")
    assert "'dc' is not KEY=VALUE" in err


# ----------------------------------------------------------------------------- exec


def _fleet(api: FakeApi) -> None:
    api.outcome("web1", "succeeded", stdout="alpha\nbeta\n", stderr="warn\n")
    api.outcome("web2", "failed", stdout="partial", exit_code=2)
    api.outcome(
        "db1",
        "undeliverable",
        via=None,
        error_code="unreachable",
        error_description="no agent session; SSH: connection refused",
    )


def test_exec_piped_shows_lines_outcomes_and_a_summary_exit_1(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    _fleet(api)
    code, out, err = _run(
        ["exec", "uptime", "--label", "role=web", "--timeout", "5", "--batch", "50%"], capsys
    )
    assert code == 1, err
    body = json.loads(api.requests[0].content)
    assert body == {
        "command": "uptime",
        "targets": {"labels": {"role": "web"}},
        "timeout": 5.0,
        "batch": "50%",
    }
    lines = out.splitlines()
    assert lines[0] == "job j1"
    # chunks of 3 characters come back as whole lines, each once, in order
    assert [ln for ln in lines if ln.startswith("web1")] == [
        "web1: alpha",
        "web1: beta",
        "web1 [stderr]: warn",
        "web1 => succeeded (exit 0, via agent)",
    ]
    assert [ln for ln in lines if ln.startswith("web2")] == [
        "web2: partial",
        "web2 => failed (exit 2, via agent)",
    ]
    assert "db1 => undeliverable (unreachable: no agent session; SSH: connection refused)" in lines
    assert lines[-3:] == [
        "job j1 finished: 3 hosts: 1 succeeded, 1 failed, 1 unreachable",
        "  db1   undeliverable  unreachable: no agent session; SSH: connection refused",
        "  web2  failed         exit 2, via agent",
    ]
    streamed = [r.url.path for r in api.requests if r.url.path.endswith("/stream")]
    assert "/api/commands/c-web1/stream" in streamed


def test_exec_all_succeeded_exits_0(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    api.outcome("web1", "succeeded", stdout="ok\n")
    api.outcome("web2", "succeeded", stdout="ok\n")
    code, out, _ = _run(["exec", "true", "web1", "web2"], capsys)
    assert code == 0
    assert json.loads(api.requests[0].content)["targets"] == {"hosts": ["web1", "web2"]}
    assert out.splitlines()[-1] == "job j1 finished: 2 hosts: 2 succeeded"


def test_exec_json_is_one_object_per_line_ending_with_the_summary(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    _fleet(api)
    code, out, _ = _run(["exec", "uptime", "--all", "--json"], capsys)
    assert code == 1
    events = [json.loads(line) for line in out.splitlines()]
    assert json.loads(api.requests[0].content)["targets"] == {"all": True}
    assert events[0]["event"] == "job"
    assert events[0]["job_id"] == "j1"
    web1 = "".join(
        e["data"]
        for e in events
        if e["event"] == "output" and e["host_id"] == "web1" and e["stream"] == "stdout"
    )
    assert web1 == "alpha\nbeta\n"
    assert {e["host_id"]: e["status"] for e in events if e["event"] == "host"} == {
        "web1": "succeeded",
        "web2": "failed",
        "db1": "undeliverable",
    }
    assert events[-1]["event"] == "summary"
    assert events[-1]["exit_status"] == 1
    assert events[-1]["counts"]["failed"] == 1


def test_a_broken_stream_resumes_after_the_last_event_without_gap_or_duplicate(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    api.outcome("web1", "succeeded", stdout="one\ntwo\nthree\n")
    api.break_stream_once.add("web1")
    code, out, _ = _run(["exec", "x", "web1"], capsys)
    assert code == 0
    assert [ln for ln in out.splitlines() if ln.startswith("web1:")] == [
        "web1: one",
        "web1: two",
        "web1: three",
    ]
    resumed = [r for r in api.requests if r.url.path.endswith("/stream")]
    assert [r.headers.get("last-event-id") for r in resumed] == [None, "1"]
    assert not any(r.url.path == "/api/commands/c-web1" for r in api.requests)  # the stream was complete


def test_without_streams_the_output_is_fetched_once_per_host(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    """An API without /stream (404): no stream is tried after the first answer says so (the three
    hosts running at the first poll try at once), and each result's output is fetched once."""
    _fleet(api)
    api.stream_status = 404
    code, out, _ = _run(["exec", "uptime", "--all"], capsys)
    assert code == 1
    assert "web1: alpha" in out.splitlines()
    assert "web2: partial" in out.splitlines()
    tried = [i for i, r in enumerate(api.requests) if r.url.path.endswith("/stream")]
    assert len(tried) == 3
    second_poll = [i for i, r in enumerate(api.requests) if r.url.path == "/api/jobs/j1"][1]
    assert max(tried) < second_poll
    assert sum(r.url.path == "/api/commands/c-web1" for r in api.requests) == 1


def test_outcomes_are_read_page_by_page(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job with more hosts than one page of outcomes: every host is followed and summed up."""
    monkeypatch.setattr(client, "OUTCOMES_PAGE", 2)
    for i in range(5):
        api.outcome(f"h{i}", "succeeded", stdout=f"out {i}\n")
    code, out, _ = _run(["exec", "x", "--all", "--json"], capsys)
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["host_id"] for e in events if e["event"] == "host") == [f"h{i}" for i in range(5)]
    offsets = {r.url.params.get("offset") for r in api.requests if r.url.path == "/api/jobs/j1"}
    assert offsets == {None, "2", "4"}


def test_a_rate_limited_poll_is_asked_again(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    """GET answered 429: asked again after Retry-After; a POST answered 429 is not sent again."""
    api.outcome("web1", "succeeded")
    api.limited.add("/api/jobs/j1")
    code, _, err = _run(["exec", "true", "web1", "-q"], capsys)
    assert code == 0, err
    polls = [r for r in api.requests if r.url.path == "/api/jobs/j1"]
    assert len(polls) == api.polls + 1
    sent = len(api.requests)
    api.limited.add("/api/jobs")
    code, _, err = _run(["exec", "true", "web1"], capsys)
    assert (code, err) == (1, "warlock: rate limited (HTTP 429)\n")
    assert [r.method for r in api.requests[sent:]] == ["POST"]


def test_a_cancelled_job_is_followed_until_its_runs_in_flight_end(
    api: FakeApi, capsys: pytest.CaptureFixture[str]
) -> None:
    """state cancelled with runs still in flight (counts.pending > 0): not the end yet."""
    api.outcome("web1", "succeeded", stdout="done\n")
    api.outcome("web2", "cancelled", via=None, error_description="cancelled before its batch")
    api.cancelled = True
    code, out, _ = _run(["exec", "x", "--all"], capsys)
    assert code == 1
    lines = out.splitlines()
    assert "web1: done" in lines
    assert lines[-2:] == [
        "job j1 cancelled: 2 hosts: 1 succeeded, 1 cancelled",
        "  web2  cancelled  cancelled before its batch",
    ]
    assert api.polls == 3  # web2 final from the third poll on


def test_output_of_at_most_output_hosts_hosts(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    """--output-hosts 1: one host's output (one stream or fetch), the others' outcomes only, and a note."""
    _fleet(api)
    code, out, err = _run(["exec", "uptime", "--all", "--output-hosts", "1"], capsys)
    assert code == 1
    assert "web1: alpha" in out.splitlines()
    assert "web2: partial" not in out
    assert "web2 => failed (exit 2, via agent)" in out.splitlines()
    asked = {r.url.path.split("/")[3] for r in api.requests if r.url.path.startswith("/api/commands/")}
    assert asked == {"c-web1"}
    assert err.startswith("warlock: output of 2 hosts not shown (--output-hosts N shows more;")


def test_exec_quiet_and_detach(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    _fleet(api)
    code, out, _ = _run(["exec", "uptime", "--all", "-q"], capsys)
    assert code == 1
    assert "web1: alpha" not in out
    assert "web1 => succeeded (exit 0, via agent)" in out
    assert not any(r.url.path.startswith("/api/commands/") for r in api.requests)
    code, out, _ = _run(["exec", "uptime", "--all", "--detach"], capsys)
    assert (code, out) == (0, "j1\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["exec", "uptime"], "exactly one of them"),
        (["exec", "uptime", "web1", "--all"], "exactly one of them"),
        (["exec", "uptime", "--label", "a=b", "--all"], "exactly one of them"),
        (["exec", "uptime", "--all", "--batch", "0"], "--batch"),
        (["exec", "uptime", "--all", "--batch", "150%"], "--batch"),
        (["exec", "uptime", "--all", "--timeout", "0"], "--timeout"),
    ],
)
def test_exec_usage_errors_exit_2_and_send_nothing(
    api: FakeApi, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    code, out, err = _run(argv, capsys)
    assert (code, out) == (2, "")
    assert message in err
    assert api.requests == []


def test_exit_statuses_of_api_failures(
    api: FakeApi, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """401 → 2 (the key), 4xx → 1 with the API's detail, 5xx and no answer → 3."""
    monkeypatch.setenv("WARLOCK_API_KEY", "wrong")
    code, _, err = _run(["jobs"], capsys)
    assert code == 2
    assert "the API refused the key (invalid API key)" in err
    monkeypatch.setenv("WARLOCK_API_KEY", KEY)
    code, _, err = _run(["cancel", "gone"], capsys)
    assert (code, err) == (1, "warlock: unknown command gone (HTTP 404)\n")

    def failing(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "database unavailable"})

    monkeypatch.setattr(ops, "TRANSPORT", httpx.MockTransport(failing))
    code, _, err = _run(["job", "j1"], capsys)
    assert (code, err) == (3, "warlock: the API at http://api.test answered 503: database unavailable\n")

    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(ops, "TRANSPORT", httpx.MockTransport(refused))
    code, _, err = _run(["exec", "true", "--all"], capsys)
    assert code == 3
    assert (
        err
        == "warlock: cannot reach the API at http://api.test: ConnectError: [Errno 111] Connection refused\n"
    )


# ----------------------------------------------------------------------------- jobs, job, cancel


def test_jobs_job_and_cancel(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    _fleet(api)
    api.polls = 10
    code, out, _ = _run(["jobs"], capsys)
    assert code == 0
    assert out.splitlines()[1].split("  ")[0] == "j1"
    assert "1 succeeded, 1 failed, 1 unreachable" in out
    code, out, _ = _run(["job", "j1"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "job j1 finished: 1 succeeded, 1 failed, 1 unreachable"
    assert lines[2].split() == [
        "db1",
        "undeliverable",
        "c-db1",
        "unreachable:",
        "no",
        "agent",
        "session;",
        "SSH:",
        "connection",
        "refused",
    ]
    code, out, _ = _run(["job", "j1", "--json"], capsys)
    assert json.loads(out)["job_id"] == "j1"
    code, out, _ = _run(["cancel", "abc"], capsys)
    assert (code, out) == (0, "command abc: cancelled\n")
    assert api.requests[-1].url.path == "/api/commands/abc/cancel"
    code, out, _ = _run(["cancel", "--job", "j/../x"], capsys)
    assert (code, out) == (0, "job j/../x: cancelling\n")
    assert api.requests[-1].url.raw_path == b"/api/jobs/j%2F..%2Fx/cancel"  # one path segment, always
    code, out, _ = _run(["cancel", "job-5f3a"], capsys)  # a job id by its prefix
    assert (code, out) == (0, "job job-5f3a: cancelling\n")


# ----------------------------------------------------------------------------- keys


def test_keys_create_prints_the_key_alone_on_stdout(api: FakeApi, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(
        ["keys", "create", "ci", "--role", "operate", "--scope", "role=web", "--expires", "2099-01-01"],
        capsys,
    )
    assert (code, out) == (0, "secret-key-shown-once\n")
    assert "role operate, scope role=web, expires 2099-01-01T00:00:00+00:00" in err
    assert json.loads(api.requests[-1].content) == {
        "name": "ci",
        "role": "operate",
        "scope": {"role": "web"},
        "expires_at": "2099-01-01T00:00:00+00:00",
    }
    code, _, err = _run(["keys", "create", "taken"], capsys)
    assert (code, err) == (1, "warlock: API key taken exists (HTTP 409)\n")
    code, _, err = _run(["keys", "create", "x", "--role", "root"], capsys)
    assert code == 2
    assert "one of read, operate, admin" in err
    code, out, _ = _run(["keys", "list"], capsys)
    assert out.splitlines() == [
        "name  role     scope     expires  state",
        "ci    operate  role=web  never    active",
    ]
    code, out, _ = _run(["keys", "revoke", "ci"], capsys)
    assert (code, out) == (0, "API key ci revoked\n")
    assert (api.requests[-1].method, api.requests[-1].url.path) == ("DELETE", "/api/keys/ci")


def test_parse_expiry() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert ops.parse_expiry("30d", now) == "2026-12-31T12:00:00+00:00"
    assert ops.parse_expiry("90m", now) == "2026-12-01T13:30:00+00:00"
    assert ops.parse_expiry("2027-01-01T10:00:00+02:00", now) == "2027-01-01T08:00:00+00:00"
    assert ops.parse_expiry(None, now) is None
    for bad in ("2020-01-01", "soon", "0d"):
        with pytest.raises(typer.BadParameter):
            ops.parse_expiry(bad, now)


# ----------------------------------------------------------------------------- terminal rendering


def test_terminal_sink_shows_remote_text_literally() -> None:
    """On a terminal: output above the bar, coloured outcomes, the summary; remote text that looks like
    rich markup is printed as it is."""
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system=None)
    sink = render.TerminalSink(console)
    job: dict[str, Any] = {
        "job_id": "j9",
        "state": "running",
        "hosts": [{"host_id": "h1", "status": "running"}],
    }
    sink.start(job)
    sink.output("h1", "c1", "stdout", "[red]not markup[/red]\npart")
    final = {"host_id": "h1", "status": "failed", "exit_code": 3, "via": "ssh"}
    sink.host_done(final)
    sink.finish({"job_id": "j9", "state": "finished", "hosts": [final]}, 1)
    text = buf.getvalue()
    assert "h1 | [red]not markup[/red]" in text
    assert "h1 | part" in text
    assert "h1 => failed (exit 3, via ssh)" in text
    assert "job j9 finished: 1 hosts: 0 succeeded, 1 failed" in text


def test_argparse_commands_stay_and_list_the_new_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: warlock")
    for name in ("signing-keys", "hosts", "exec", "jobs", "job", "cancel", "keys", "req", "api-key"):
        assert f"    {name} " in out


def test_ctrl_c_stops_following_and_says_the_job_goes_on(tmp_path: Path) -> None:
    """SIGINT while following: exit 130 and how to look at or cancel the job (which is not cancelled)."""
    import signal
    import subprocess
    import sys
    import time

    repo = Path(__file__).resolve().parents[2]
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(repo)!r})\n"
        "from tests.unit.test_ctl import FakeApi, KEY\n"
        "from services.ctl import cli, ops\n"
        "fake = FakeApi()\n"
        "fake.outcome('web1', 'succeeded', stdout='x\\n')\n"
        "fake.polls = -10**9  # never done\n"
        "ops.TRANSPORT = fake.transport()\n"
        "os.environ.update(WARLOCK_API_URL='http://api.test', WARLOCK_API_KEY=KEY)\n"
        "sys.exit(cli.main(['exec', 'sleep 100', 'web1']))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(driver)],
        cwd=repo,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "job j1\n"
    assert proc.stdout.readline() == "web1: x\n"  # following: the output came, the job is not done
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert out == ""
    assert err == "warlock: stopped following; job j1 goes on (warlock job j1; warlock cancel --job j1)\n"
