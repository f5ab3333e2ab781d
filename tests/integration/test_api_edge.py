"""The API's edge against a real `warlock-api` process: the key is checked and the size refused before a
body is read. Requests go over raw sockets, so a test can announce a 50 MB body and send ten bytes of it.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.support.db import api_settings, running_api
from tests.support.natsserver import NatsServer
from tests.support.stack import Api, Stack

LIMIT = 1024 * 1024  # the default WARLOCK_API_MAX_BODY_BYTES
ANSWER_WITHIN = 5.0


@pytest.fixture
def api(stack: Stack, tmp_path: Path) -> Api:
    """A real API process on SQLite, with host h1 registered (no SSH check)."""
    running = stack.start_api(f"sqlite+aiosqlite:///{tmp_path / 'api.db'}")
    added = httpx.post(
        f"{running.url}/api/hosts",
        json={"id": "h1", "address": "10.0.0.1", "ssh_check": False},
        headers=running.auth,
    )
    assert added.status_code == 201, added.text
    return running


class Answer:
    """A parsed HTTP response, and whether the server closed the connection after it."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes, closed: bool) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.closed = closed

    def json(self) -> Any:
        """The body as JSON (asserting the content type)."""
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


def exchange(api: Api, head: list[str], *body_parts: bytes) -> Answer:
    """Send a request head and `body_parts` (never more), then read one response within ANSWER_WITHIN s."""
    parts = urlsplit(api.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=ANSWER_WITHIN) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for part in body_parts:
            sock.sendall(part)
        started = time.monotonic()
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                assert chunk, f"connection closed without an answer: {data!r}"
                data += chunk
        except TimeoutError:
            raise AssertionError(f"no answer within {ANSWER_WITHIN}s: the server waits for a body") from None
        head_bytes, _, rest = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += sock.recv(65536)
        assert time.monotonic() - started < ANSWER_WITHIN
        sock.settimeout(1.0)
        try:
            closed = sock.recv(1) == b""
        except TimeoutError:
            closed = False  # kept alive
        except ConnectionResetError:
            closed = True
        return Answer(int(lines[0].split()[1]), headers, rest[:length], closed)


def post_head(path: str, length: int | None, key: str | None = None, chunked: bool = False) -> list[str]:
    """A POST request head with JSON content type, optional key, Content-Length or chunked encoding."""
    head = [f"POST {path} HTTP/1.1", "Host: api", "Content-Type: application/json"]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    if length is not None:
        head.append(f"Content-Length: {length}")
    if chunked:
        head.append("Transfer-Encoding: chunked")
    return head


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def still_serving(api: Api) -> None:
    """The API answers an authenticated request and its health check."""
    assert httpx.get(f"{api.url}/api/hosts/h1", headers=api.auth).status_code == 200
    assert httpx.get(f"{api.url}/healthz").status_code == 200


def test_unauthenticated_huge_body_is_401_before_reading(api: Api) -> None:
    """No key, Content-Length 50 MB, ten bytes sent: 401 JSON with WWW-Authenticate at once, connection
    closed; a wrong key the same."""
    for key in (None, "0" * 64):
        answer = exchange(api, post_head("/api/hosts/h1/exec", 50_000_000, key), b'{"command"')
        assert answer.status == 401
        assert answer.headers["www-authenticate"] == "Bearer"
        assert isinstance(answer.json()["detail"], str)
        assert answer.closed
    still_serving(api)


def test_authenticated_oversized_body_is_413_before_reading(api: Api) -> None:
    """With a key, Content-Length over the limit: 413 JSON at once, the body never read, connection
    closed; the API goes on serving."""
    answer = exchange(api, post_head("/api/hosts/h1/exec", 50_000_000, api.key), b'{"command"')
    assert answer.status == 413
    assert answer.json() == {"detail": f"request body larger than {LIMIT} bytes"}
    assert answer.closed
    answer = exchange(api, post_head("/api/hosts/h1/exec", LIMIT + 1, api.key), b"{")
    assert answer.status == 413
    still_serving(api)


def test_chunked_body_over_the_limit_is_413(api: Api) -> None:
    """A chunked body is counted as it arrives: 413 JSON once past the limit, before its end is sent."""
    parts = [chunk(b"x" * (256 * 1024)) for _ in range(4)] + [chunk(b"x" * 1024)]
    answer = exchange(api, post_head("/api/hosts/h1/exec", None, api.key, chunked=True), *parts)
    assert answer.status == 413
    assert answer.json() == {"detail": f"request body larger than {LIMIT} bytes"}
    still_serving(api)


def test_small_chunked_body_is_served(api: Api) -> None:
    """A chunked body under the limit reaches the route as usual."""
    body = json.dumps({"command": "true", "timeout": 5}).encode()
    answer = exchange(
        api, post_head("/api/hosts/h1/exec", None, api.key, chunked=True), chunk(body), b"0\r\n\r\n"
    )
    assert answer.status == 200, answer.body
    assert answer.json()["command"] == "true"


@pytest.mark.parametrize("body", [b"{not json", b'{"command": "tr', b"\xff\xfe{}", b"[1, 2"])
def test_malformed_body_is_401_without_a_key_and_4xx_json_with_one(api: Api, body: bytes) -> None:
    """A malformed body without a key is 401 (it was parsed first: 422 to anyone); with a key it is a
    JSON 422 or 400, never a 500."""
    anonymous = exchange(api, post_head("/api/hosts/h1/exec", len(body)), body)
    assert anonymous.status == 401
    keyed = exchange(api, post_head("/api/hosts/h1/exec", len(body), api.key), body)
    assert keyed.status in (400, 422), keyed.body
    assert "detail" in keyed.json()
    still_serving(api)


def test_longest_command_fits_the_default_limit(api: Api) -> None:
    """65,536 characters written as JSON escapes (6 bytes each, or 12 for a pair) fit in 1 MiB."""
    for escaped in ("\\u00e9", "\\ud83d\\ude00"):
        body = b'{"command": "' + escaped.encode() * 65_536 + b'", "timeout": 5}'
        assert len(body) < LIMIT
        answer = exchange(api, post_head("/api/hosts/h1/exec", len(body), api.key), body)
        assert answer.status == 200, answer.body[:300]
        assert len(answer.json()["command"]) == 65_536


@pytest.fixture
async def small_limit_api(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[httpx.AsyncClient]:
    """The API in-process with WARLOCK_API_MAX_BODY_BYTES=2048, a client carrying its key."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    async with running_api(api_settings(tmp_path, nats_server.url, url, max_body_bytes=2048)) as running:
        running.client.headers.update(running.auth)
        added = await running.client.post(
            "/api/hosts", json={"id": "h1", "address": "10.0.0.1", "ssh_check": False}
        )
        assert added.status_code == 201
        yield running.client


async def test_body_limit_is_a_setting(small_limit_api: httpx.AsyncClient) -> None:
    """max_body_bytes decides: 2,000 bytes pass (422: command too long), 3,000 bytes are 413."""
    fits = await small_limit_api.post("/api/hosts/h1/exec", json={"command": "x" * 1_900, "timeout": 5})
    assert fits.status_code == 200, fits.text
    over = await small_limit_api.post("/api/hosts/h1/exec", json={"command": "x" * 3_000})
    assert over.status_code == 413
    assert over.json() == {"detail": "request body larger than 2048 bytes"}
