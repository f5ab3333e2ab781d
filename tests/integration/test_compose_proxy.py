"""The compose file's nginx in front of a real API: the dashboard, its browser stream (a WebSocket) and a
command's output stream (SSE) pass through it, on :8080 and on :8443 (TLS).

The shipped ``deploy/compose/nginx.conf`` is run by Debian's nginx with only what Docker would provide
replaced: the upstream names (``api:8000``, ``gateway:8765``) by loopback addresses, the listen ports by free
ones, the certificate paths by test certificates (trustme).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest
import trustme
from websockets.asyncio.client import connect

from services.dev.procs import free_port
from tests.support.db import fresh_database
from tests.support.stack import Stack

NGINX = "/usr/sbin/nginx"
COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is installed by .ci/run"),
]


class Proxy:
    """nginx running the shipped config in `root`, in front of the API at `api_port`."""

    def __init__(self, root: Path, api_port: int, ca: trustme.CA) -> None:
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(root / "lb.pem"))
        cert.private_key_pem.write_to_path(str(root / "lb.key"))
        self.http_port, self.tls_port = free_port(), free_port()
        conf = (
            (COMPOSE_DIR / "nginx.conf")
            .read_text()
            .replace("/etc/nginx/tls/", f"{root}/")
            .replace("api:8000", f"127.0.0.1:{api_port}")
            .replace("gateway:8765", "127.0.0.1:9")
            .replace("listen 8443 ssl;", f"listen 127.0.0.1:{self.tls_port} ssl;")
            .replace("listen 8080;", f"listen 127.0.0.1:{self.http_port};")
        )
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):  # not Debian's /var/lib/nginx
            (root / temp).mkdir()
            conf = conf.replace("http {", f"http {{\n  {temp}_temp_path {root / temp};", 1)
        (root / "logs").mkdir()
        (root / "nginx.conf").write_text(conf)
        self.root = root
        globals_ = f"pid {root}/nginx.pid; error_log {root}/error.log; daemon off; master_process off;"
        self.proc = subprocess.Popen(
            [NGINX, "-c", str(root / "nginx.conf"), "-p", str(root), "-g", globals_],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # its errors go to error.log
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def proxy_root(tmp_path: Path) -> Path:
    root = tmp_path / "nginx"
    root.mkdir()
    return root


async def _wait_up(url: str, verify: ssl.SSLContext | bool = True) -> None:
    async with httpx.AsyncClient(verify=verify, timeout=5) as http:
        for _ in range(100):
            try:
                await http.get(url)
                return
            except httpx.TransportError:
                await asyncio.sleep(0.05)
    raise AssertionError(f"nginx never answered on {url}")


@pytest.mark.parametrize("tls", [False, True])
async def test_the_dashboard_and_its_browser_stream_pass_through_the_compose_nginx(
    stack: Stack, tmp_path: Path, proxy_root: Path, ca: trustme.CA, tls: bool
) -> None:
    async with fresh_database("sqlite", tmp_path) as db_url:
        api = stack.start_api(db_url)
        api_port = int(api.url.rsplit(":", 1)[1])
        proxy = Proxy(proxy_root, api_port, ca)
        try:
            client_tls = ssl.create_default_context()
            ca.configure_trust(client_tls)
            scheme, port = ("https", proxy.tls_port) if tls else ("http", proxy.http_port)
            base = f"{scheme}://127.0.0.1:{port}"
            await _wait_up(base + "/healthz", client_tls if tls else True)
            async with httpx.AsyncClient(
                base_url=base, headers=api.auth, verify=client_tls if tls else True, timeout=30
            ) as http:
                page = await http.get("/", headers={"Authorization": ""})
                assert page.status_code == 200, page.text
                assert "warlock-socket.js" in page.text
                assert "connect-src 'self'" in page.headers["content-security-policy"]
                got = await http.post("/api/ws-tickets")
                assert got.status_code == 201, got.text
                ws_url = f"{'wss' if tls else 'ws'}://127.0.0.1:{port}/api/ws?ticket={got.json()['ticket']}"
                async with connect(ws_url, ssl=client_tls if tls else None, open_timeout=10) as ws:
                    await ws.send(json.dumps({"type": "ping", "id": 7}))
                    answer = json.loads(await ws.recv())
                    assert (answer["type"], answer["id"]) == ("pong", 7)
                    await ws.send(json.dumps({"type": "subscribe", "topic": "presence", "id": 8}))
                    assert json.loads(await ws.recv())["type"] == "ack"
        finally:
            proxy.stop()
