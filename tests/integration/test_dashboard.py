"""The dashboard in a real browser (Debian's Chromium via Playwright) against `warlock run`: a real API,
gateway, SSH worker, agent and sshd. One `warlock run` for the module (agent metrics every second).

- log in; the local host is listed with its agent connected; its metrics move without a reload (the host
  view's charts gain live points); a command's output streams in before it ends, then exit 0 via agent;
- the agent stops: the row says "SSH only" (its SSH key is pinned), and "agent" again once it is back;
- the socket is cut (a proxy between browser and API resets it and refuses connections): the indicator
  leaves "connected", then comes back by itself and the metrics flow again (subscriptions re-sent);
- bad input: a wrong key at login shows the error and opens no socket; a read key's command shows the
  403 detail; ``/`` and its files need no key but ``/api/fleet`` does (401 JSON); the page's CSP.

Every test saves a screenshot of its final page (tests/support/browser.py says where).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from services.dev.files import ensure_ssh_key
from tests.integration.test_e2e_devstack import DevRun
from tests.support.browser import CuttableProxy, Watched, chromium, log_in, open_page, screenshot
from tests.support.sshd import Sshd

pytestmark = pytest.mark.e2e

HOST = "devbox"
ROW = f'#hosts .row[data-host="{HOST}"]'


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevRun]:
    """One `warlock run` for the module, with an sshd the fallback can log in to (so a stopped agent
    leaves the host "SSH only") and agent metrics every second."""
    tmp = tmp_path_factory.mktemp("dashboard")
    state = tmp / "state"
    worker_key = ensure_ssh_key(state / "ssh" / "id_ed25519")  # the launcher reuses it
    sshd = Sshd(tmp / "sshd")
    sshd.authorize(worker_key.with_suffix(".pub").read_text())
    run = DevRun(
        tmp,
        state,
        "run",
        WARLOCK_DEV_SSH_PORT=str(sshd.port),
        WARLOCK_AGENT_METRICS_INTERVAL="1",
        WARLOCK_GATEWAY_PING_INTERVAL="0.5",  # keepalives measure the latency column's rtt_ms
    )
    try:
        assert "SSH fallback ready" in run.log()
        yield run
        assert run.stop() == 0
    finally:
        run.close()
        sshd.stop()


@pytest.fixture
async def page(dev: DevRun, request: pytest.FixtureRequest) -> AsyncIterator[Watched]:
    """A fresh browser page on the dashboard (direct to the API); screenshot at the end."""
    async with chromium() as browser:
        watched = await open_page(browser, dev.info["api_url"] + "/")
        try:
            yield watched
        finally:
            await screenshot(watched.page, request.node.name)


async def _key(dev: DevRun, name: str, role: str) -> str:
    async with httpx.AsyncClient(base_url=dev.info["api_url"], timeout=30) as http:
        made = await http.post(
            "/api/keys", json={"name": name, "role": role}, headers={"Authorization": f"Bearer {dev.key}"}
        )
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


async def _points(watched: Watched, chart: str) -> int:
    return int(await watched.page.get_attribute(f"#chart-{chart}", "data-points") or 0)


@contextlib.asynccontextmanager
async def proxied_login(dev: DevRun, key: str, shot: str) -> AsyncIterator[tuple[CuttableProxy, Watched]]:
    """A dashboard page loaded through a proxy the test can cut, logged in with `key` and connected; its
    screenshot `shot` saved at the end."""
    api = httpx.URL(dev.info["api_url"])
    proxy = CuttableProxy(str(api.host), int(api.port or 80))
    await proxy.start()
    try:
        async with chromium() as browser:
            page = await open_page(browser, proxy.url + "/")
            try:
                await log_in(page.page, key)
                await page.page.wait_for_selector("#warlock-indicator[data-state=connected]", timeout=10_000)
                yield proxy, page
            finally:
                await screenshot(page.page, shot)
    finally:
        await proxy.close()


async def test_login_live_host_metrics_streamed_command_and_presence(dev: DevRun, page: Watched) -> None:
    p = page.page
    t0 = time.monotonic()
    await log_in(p, dev.key)
    await p.wait_for_selector("#warlock-indicator[data-state=connected]", timeout=10_000)
    await p.wait_for_selector(f'{ROW}[data-presence="agent"]', timeout=10_000)
    assert "agent" in await p.inner_text(ROW)
    # the latest cpu/mem/disk: from /api/fleet, or from the first live sample
    await p.wait_for_function(f"() => document.querySelector('{ROW} .c-cpu').textContent.endsWith('%')")
    assert await p.evaluate("sessionStorage.getItem('warlock.apiKey')") == dev.key
    assert all("?ticket=" in url and dev.key not in url for url in page.sockets), page.sockets
    logged_in_s = time.monotonic() - t0

    # the host view: history, then live points every second (no reload)
    await p.click(ROW)
    await p.wait_for_selector(f'#detail-host:has-text("{HOST}")')
    await p.wait_for_function(
        "() => +document.getElementById('chart-cpu').dataset.points >= 1", timeout=10_000
    )
    before = await _points(page, "cpu")
    await p.wait_for_function(
        f"() => +document.getElementById('chart-cpu').dataset.points >= {before + 2}", timeout=15_000
    )
    assert await _points(page, "mem") >= before + 2
    assert (await p.inner_text("#detail-cpu")).endswith("%")
    # the latency column: the gateway ⇄ agent keepalive round trip the samples carry
    await p.wait_for_function(
        f"() => / ms$/.test(document.querySelector('{ROW} .c-rtt').textContent)", timeout=10_000
    )

    # a command whose output streams: partial output is visible while the command still runs
    assert await p.input_value("#cmd-target") == HOST
    await p.fill("#cmd-input", "for i in 1 2 3 4 5 6; do echo line$i; sleep 0.4; done")
    await p.click("#cmd-run")
    partial = await p.wait_for_function(
        """() => {
            const out = document.getElementById('cmd-output').textContent;
            const state = document.getElementById('cmd-status').dataset.state;
            return out.includes('line2') && !out.includes('line6') && state === 'running' ? out : null;
        }""",
        timeout=10_000,
        polling=50,
    )
    shown = str(await partial.json_value())
    assert "line6" not in shown
    # from the first byte: line1 was printed before the page knew the command's id (the output
    # subscription replays the stored chunks, then follows live ones)
    assert shown.startswith("line1\nline2\n"), shown
    await p.wait_for_selector("#cmd-status[data-state=succeeded]", timeout=20_000)
    status = (
        await p.get_attribute("#cmd-status", "data-via"),
        await p.get_attribute("#cmd-status", "data-exit"),
    )
    assert status == ("agent", "0")
    assert "exit 0" in await p.inner_text("#cmd-status")
    assert await p.inner_text("#cmd-output") == "".join(f"line{i}\n" for i in range(1, 7))

    # the agent stops: SSH only (its SSH host key is pinned); started again: agent
    await asyncio.to_thread(dev.agent, "stop")
    await p.wait_for_selector(f'{ROW}[data-presence="ssh"]', timeout=15_000)
    assert "SSH only" in await p.inner_text(ROW)
    assert await p.get_attribute("#detail-presence", "data-presence") == "ssh"
    await asyncio.to_thread(dev.agent, "start")
    await p.wait_for_selector(f'{ROW}[data-presence="agent"]', timeout=15_000)
    assert page.errors == []
    assert logged_in_s < 15


async def test_indicator_follows_a_cut_socket_and_subscriptions_come_back(dev: DevRun) -> None:
    async with proxied_login(dev, dev.key, "test_indicator_follows_a_cut_socket") as (proxy, page):
        p = page.page
        assert await p.inner_text("#warlock-indicator") == "Connected"
        await p.click(ROW)
        await p.wait_for_function(
            "() => +document.getElementById('chart-cpu').dataset.points >= 2", timeout=15_000
        )
        proxy.cut()
        await p.wait_for_selector("#warlock-indicator[data-state=connecting]", timeout=5_000)
        assert (await p.inner_text("#warlock-indicator")).startswith("Connecting")
        await asyncio.sleep(2)  # a few failed attempts (connections refused) while cut
        assert await p.get_attribute("#warlock-indicator", "data-state") != "connected"
        stalled = await _points(page, "cpu")
        t_resume = time.monotonic()
        proxy.resume()
        await p.wait_for_selector("#warlock-indicator[data-state=connected]", timeout=15_000)
        back_s = time.monotonic() - t_resume
        # the host view's metrics subscription was re-sent on the new socket
        await p.wait_for_function(
            f"() => +document.getElementById('chart-cpu').dataset.points >= {stalled + 2}",
            timeout=15_000,
        )
        assert len(page.sockets) >= 2  # a new socket, with a new ticket
        assert len(set(page.sockets)) == len(page.sockets)
        assert back_s < 12, back_s  # backoff capped at 10 s


async def test_bad_key_read_key_and_what_needs_a_key(dev: DevRun, page: Watched) -> None:
    p = page.page
    tickets: list[str] = []
    p.on("request", lambda r: tickets.append(r.url) if "/api/ws-tickets" in r.url else None)
    # a wrong key: the error shown, no ticket asked for, no socket opened, nothing kept
    await log_in(p, "0" * 64)
    await p.wait_for_selector("#login-error:not([hidden])")
    assert "401" in await p.inner_text("#login-error")
    assert page.sockets == []
    assert tickets == []
    assert await p.evaluate("sessionStorage.getItem('warlock.apiKey')") is None
    assert await p.is_hidden("#app")

    # a read key sees the fleet but its command is refused with the 403 detail
    read_key = await _key(dev, "dashboard-read", "read")
    await log_in(p, read_key)
    await p.wait_for_selector(f'{ROW}[data-presence="agent"]', timeout=10_000)
    await p.fill("#cmd-target", HOST)
    await p.fill("#cmd-input", "true")
    await p.click("#cmd-run")
    await p.wait_for_selector("#cmd-error:not([hidden])")
    error = await p.inner_text("#cmd-error")
    assert "HTTP 403" in error, error
    assert "needs operate" in error, error
    await p.click("#logout")
    await p.wait_for_selector("#login:not([hidden])")
    assert await p.evaluate("sessionStorage.getItem('warlock.apiKey')") is None
    await p.wait_for_selector("#warlock-indicator[data-state=disconnected]")

    async with httpx.AsyncClient(base_url=dev.info["api_url"], timeout=30) as http:
        for path in ("/", "/ui/warlock-socket.js", "/ui/dashboard.js", "/ui/dashboard.css"):
            got = await http.get(path)
            assert got.status_code == 200, (path, got.status_code)
        home = await http.get("/")
        csp = home.headers["content-security-policy"]
        assert "script-src 'self'" in csp
        assert "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert f"connect-src 'self' ws://{api_host(dev)}" in csp
        assert (await http.get("/ui/../main.py")).status_code == 404
        assert (await http.get("/ui/index.html")).status_code == 404
        cached = await http.get("/ui/dashboard.js", headers={"If-None-Match": home.headers.get("etag", "")})
        assert cached.status_code == 200  # another file's ETag does not match
        etag = (await http.get("/ui/dashboard.js")).headers["etag"]
        assert (await http.get("/ui/dashboard.js", headers={"If-None-Match": etag})).status_code == 304
        fleet = await http.get("/api/fleet")
        assert fleet.status_code == 401
        assert "detail" in fleet.json()
        bad = await http.get("/api/fleet?label==x", headers={"Authorization": f"Bearer {dev.key}"})
        assert bad.status_code == 422, bad.text
        rows = (await http.get("/api/fleet", headers={"Authorization": f"Bearer {dev.key}"})).json()
        assert [r["id"] for r in rows] == [HOST]
        assert rows[0]["presence"] == "agent"
        assert rows[0]["ssh_fallback"] is True
        assert rows[0]["cpu"] is not None
        assert rows[0]["sampled_at"] is not None
    assert page.errors == [] or all("401" in e or "403" in e for e in page.errors), page.errors


def api_host(dev: DevRun) -> str:
    """host:port of the dev API."""
    url = httpx.URL(dev.info["api_url"])
    return f"{url.host}:{url.port}"


async def test_client_acks_errors_and_a_revoked_key_stops_it(dev: DevRun) -> None:
    """`WarlockSocket.emit` gets the reply frame with its id (ack, error); an emit while disconnected
    fails at once; once the key is revoked, the next reconnect's ticket request is refused (401): the
    client stops (indicator disconnected) and the page asks for a key again."""
    name = "dashboard-revoked"
    key = await _key(dev, name, "operate")
    async with proxied_login(dev, key, "test_client_acks_errors_and_a_revoked_key_stops_it") as (proxy, page):
        p = page.page
        replies = await p.evaluate(
            """async () => {
                const ask = (type, data) =>
                    new Promise((done) => WarlockSocket.emit(type, data, done));
                return [
                    await ask("subscribe", {topic: "commands", host: "devbox"}),
                    await ask("subscribe", {topic: "no-such-topic"}),
                    await ask("unsubscribe", {topic: "commands", host: "devbox"}),
                ];
            }"""
        )
        assert [r["type"] for r in replies] == ["ack", "error", "ack"], replies
        assert replies[1]["code"] == "unknown_topic"
        assert len({r["id"] for r in replies}) == 3
        assert await p.evaluate("WarlockSocket.isConnected()") is True

        async with httpx.AsyncClient(base_url=dev.info["api_url"], timeout=30) as http:
            gone = await http.delete(f"/api/keys/{name}", headers={"Authorization": f"Bearer {dev.key}"})
            assert gone.status_code in (200, 204), gone.text
        proxy.cut()
        await p.wait_for_selector("#warlock-indicator[data-state=connecting]", timeout=5_000)
        offline = await p.evaluate(
            "() => new Promise((done) => WarlockSocket.emit('subscribe', {topic: 'presence'}, done))"
        )
        assert (offline["type"], offline["code"]) == ("error", "disconnected")
        proxy.resume()
        # the auth cache holds a verified key for 5 s at most: then the ticket request is refused
        await p.wait_for_selector("#login:not([hidden])", timeout=20_000)
        await p.wait_for_selector("#warlock-indicator[data-state=disconnected]")
        assert "Logged out" in await p.inner_text("#login-error")
        assert await p.evaluate("sessionStorage.getItem('warlock.apiKey')") is None
        sockets = len(page.sockets)
        await asyncio.sleep(1.5)
        assert len(page.sockets) == sockets  # stopped: no more attempts
