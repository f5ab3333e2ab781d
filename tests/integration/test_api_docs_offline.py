"""``/docs`` works on a network without internet: Swagger UI and every file it loads come from the API."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from services.api.http.routes.docs import SWAGGER_DIR
from tests.support.db import RunningApi, api_settings, running_api
from tests.support.natsserver import NatsServer

MANIFEST = json.loads((SWAGGER_DIR / "MANIFEST.json").read_text())
EXPECTED_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture
async def api(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[RunningApi]:
    """The API in-process on SQLite (the pages touch no database; one backend is enough)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'warlock.db'}"
    async with running_api(api_settings(tmp_path, nats_server.url, url)) as running:
        yield running


class References(HTMLParser):
    """Every src and href of a page, with the tag that carries it."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href"} and value is not None:
                self.found.append((tag, name, value))


def references(html: str) -> list[tuple[str, str, str]]:
    parser = References()
    parser.feed(html)
    parser.close()
    return parser.found


async def test_docs_reference_only_the_api_itself(api: RunningApi) -> None:
    """/docs (no key) names no http(s):// or protocol-relative URL: each src/href resolves to this API."""
    response = await api.client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "http://" not in response.text
    assert "https://" not in response.text
    refs = references(response.text)
    # the stylesheet, the icon and the script: a page that lost one would not be Swagger UI
    assert {(tag, attr) for tag, attr, _ in refs} == {("link", "href"), ("script", "src")}
    assert len(refs) == 3
    base = str(api.client.base_url) + "/docs"
    for _tag, _attr, value in refs:
        assert urlsplit(value).scheme == "", value
        assert not value.startswith("//"), value
        assert urlsplit(urljoin(base, value)).netloc == api.client.base_url.host, value
    # Swagger UI's own defaults must not fetch from the internet either (validator.swagger.io badge)
    assert '"validatorUrl": null' in response.text
    assert "url: '/openapi.json'" in response.text


async def test_every_referenced_asset_is_served_as_vendored(api: RunningApi) -> None:
    """Each file /docs loads answers 200, without a key, with its type, and the manifest's SHA-256."""
    refs = references((await api.client.get("/docs")).text)
    seen = set()
    for _tag, _attr, value in refs:
        response = await api.client.get(value)
        assert response.status_code == 200, value
        name = value.rsplit("/", 1)[1]
        seen.add(name)
        expected = EXPECTED_TYPES[Path(name).suffix]
        assert response.headers["content-type"].split(";")[0] == expected, value
        assert hashlib.sha256(response.content).hexdigest() == MANIFEST["files"][name]["sha256"], value
        assert len(response.content) == MANIFEST["files"][name]["bytes"]
        assert response.headers["cache-control"] == "public, max-age=86400"
        assert response.headers["etag"] == f'"{MANIFEST["files"][name]["sha256"]}"'
    assert seen == {"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"}


async def test_vendored_files_match_their_manifest_and_keep_their_licence() -> None:
    """The directory holds exactly the manifest's files, byte for byte, the Apache-2.0 licence among them."""
    on_disk = {p.name for p in SWAGGER_DIR.iterdir()} - {"MANIFEST.json"}
    assert on_disk == set(MANIFEST["files"])
    for name, entry in MANIFEST["files"].items():
        assert hashlib.sha256((SWAGGER_DIR / name).read_bytes()).hexdigest() == entry["sha256"], name
    assert "Apache License" in (SWAGGER_DIR / "LICENSE").read_text()
    assert MANIFEST["package"] == "swagger-ui-dist"
    assert MANIFEST["version"].startswith("5.")
    assert MANIFEST["source"].endswith(f"swagger-ui-dist-{MANIFEST['version']}.tgz")


async def test_licence_files_are_served_as_text(api: RunningApi) -> None:
    """The licence travels with the files: LICENSE and NOTICE are served too, as plain text."""
    for name in ("LICENSE", "NOTICE", "swagger-ui-bundle.js.LICENSE.txt"):
        response = await api.client.get(f"/static/swagger-ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == "text/plain; charset=utf-8"
        assert hashlib.sha256(response.content).hexdigest() == MANIFEST["files"][name]["sha256"]


async def test_unlisted_names_are_404_not_files(api: RunningApi) -> None:
    """Only the manifest's names are served: the manifest itself, other files, traversal attempts are not."""
    for path in (
        "/static/swagger-ui/MANIFEST.json",
        "/static/swagger-ui/swagger-ui.js",
        "/static/swagger-ui/..%2Fdocs.py",
        "/static/swagger-ui/%2e%2e%2f%2e%2e%2fmain.py",
        "/static/swagger-ui/../../services/api/main.py",
        "/static/swagger-ui/",
    ):
        response = await api.client.get(path)
        assert response.status_code == 404, path
        assert "application/json" in response.headers["content-type"], path


async def test_if_none_match_answers_304(api: RunningApi) -> None:
    """A browser revalidating with the ETag gets 304 and no body; a stale ETag gets the file."""
    first = await api.client.get("/static/swagger-ui/swagger-ui.css")
    again = await api.client.get(
        "/static/swagger-ui/swagger-ui.css", headers={"If-None-Match": first.headers["etag"]}
    )
    assert again.status_code == 304
    assert again.content == b""
    stale = await api.client.get("/static/swagger-ui/swagger-ui.css", headers={"If-None-Match": '"old"'})
    assert stale.status_code == 200
    assert stale.content == first.content


async def test_no_key_needed_and_no_cdn_docs_left(api: RunningApi) -> None:
    """A client with no Authorization header at all gets /docs, its assets and /openapi.json; /redoc is off
    (FastAPI's would load ReDoc from a CDN); /api still asks for a key."""
    transport = httpx.ASGITransport(app=api.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as bare:
        for path in ("/docs", "/static/swagger-ui/swagger-ui-bundle.js", "/openapi.json"):
            assert (await bare.get(path)).status_code == 200, path
        assert (await bare.get("/redoc")).status_code == 404
        assert (await bare.get("/docs/oauth2-redirect")).status_code == 404
        assert (await bare.get("/api/hosts")).status_code == 401
    paths = (await api.client.get("/openapi.json")).json()["paths"]
    assert not any(p.startswith(("/docs", "/static")) for p in paths)  # not API routes


async def test_docs_follow_the_root_path(tmp_path: Path, nats_server: NatsServer) -> None:
    """Behind a proxy that mounts the API under a prefix (root_path), the page's URLs carry the prefix."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'warlock.db'}"
    async with running_api(api_settings(tmp_path, nats_server.url, url)) as running:
        transport = httpx.ASGITransport(app=running.app, root_path="/warlock")
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            html = (await client.get("/docs")).text
    values = [value for _tag, _attr, value in references(html)]
    assert values
    assert all(value.startswith("/warlock/static/swagger-ui/") for value in values)
    assert "url: '/warlock/openapi.json'" in html


async def test_text_assets_go_gzipped_to_clients_that_accept_it(api: RunningApi) -> None:
    """The bundle is compressed on the wire when accepted (and decompresses to the manifest's bytes); sent
    as is to a client that does not accept gzip; the PNG is never recompressed."""
    url = "/static/swagger-ui/swagger-ui-bundle.js"
    entry = MANIFEST["files"]["swagger-ui-bundle.js"]
    async with api.client.stream("GET", url, headers={"Accept-Encoding": "gzip"}) as response:
        wire = b"".join([chunk async for chunk in response.aiter_raw()])
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["vary"] == "Accept-Encoding"
    assert len(wire) < entry["bytes"] // 2
    assert hashlib.sha256(gzip.decompress(wire)).hexdigest() == entry["sha256"]
    for refused in ("identity", "gzip;q=0", ""):
        plain = await api.client.get(url, headers={"Accept-Encoding": refused})
        assert "content-encoding" not in plain.headers, refused
        assert hashlib.sha256(plain.content).hexdigest() == entry["sha256"]
    png = await api.client.get("/static/swagger-ui/favicon-32x32.png", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in png.headers
