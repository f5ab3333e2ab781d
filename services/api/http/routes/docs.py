"""``/docs`` (Swagger UI) and its assets, all served by the API itself: no CDN, no API key.

The Swagger UI files are vendored, unchanged, from the npm package ``swagger-ui-dist`` under
``services/api/http/static/swagger-ui/`` beside their licence (Apache-2.0: LICENSE, NOTICE) and a
``MANIFEST.json`` naming the version, where it came from and the SHA-256 of every file. Only the files the
manifest lists are served, at ``/static/swagger-ui/<name>``, each with an ``ETag`` (its SHA-256) and a day of
``Cache-Control``; ``If-None-Match`` answers 304. Text files go gzip-compressed to a client that accepts it
(the 1.7 MB bundle is ~0.5 MB on the wire), compressed once per process. FastAPI's own ``/docs`` (which
loads from cdn.jsdelivr.net) and ``/redoc`` are turned off in `services.api.main`; ReDoc is not vendored
(Swagger UI covers the same need).
"""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

SWAGGER_DIR = Path(__file__).resolve().parent.parent / "static" / "swagger-ui"
ASSET_PREFIX = "/static/swagger-ui"
CACHE_CONTROL = "public, max-age=86400"
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
TEXT = "text/plain; charset=utf-8"  # LICENSE, NOTICE, *.LICENSE.txt

router = APIRouter(include_in_schema=False)


@dataclass(frozen=True)
class Asset:
    """One vendored file, read once: its bytes, content type and SHA-256 (from the manifest)."""

    body: bytes
    content_type: str
    sha256: str
    gzipped: bytes | None  # the body compressed, for the text types (a PNG is compressed already)


@functools.cache
def manifest() -> dict[str, object]:
    """The vendored Swagger UI's MANIFEST.json (package, version, source, files with their SHA-256)."""
    loaded: dict[str, object] = json.loads((SWAGGER_DIR / "MANIFEST.json").read_text())
    return loaded


@functools.cache
def asset(name: str) -> Asset | None:
    """The file `name` if the manifest lists it (nothing else under the directory is reachable)."""
    files = manifest()["files"]
    assert isinstance(files, dict)
    entry = files.get(name)
    if entry is None:
        return None
    content_type = CONTENT_TYPES.get(Path(name).suffix, TEXT)
    body = (SWAGGER_DIR / name).read_bytes()
    gzipped = gzip.compress(body, mtime=0) if content_type.startswith("text/") else None
    return Asset(body, content_type, str(entry["sha256"]), gzipped)


def accepts_gzip(request: Request) -> bool:
    """Whether the request's Accept-Encoding lists gzip (and does not refuse it with q=0)."""
    for part in request.headers.get("accept-encoding", "").lower().split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip() == "gzip":
            return params.replace(" ", "") not in {"q=0", "q=0.0", "q=0.00", "q=0.000"}
    return False


@router.get("/docs", response_class=HTMLResponse)
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for this API's OpenAPI document, loading only files this API serves."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSET_PREFIX}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSET_PREFIX}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSET_PREFIX}/favicon-32x32.png",
        oauth2_redirect_url=None,  # the API key is a bearer token: no OAuth flow to return to
        # no badge fetched from validator.swagger.io (the default validator URL)
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(ASSET_PREFIX + "/{name}")
async def swagger_asset(name: str, request: Request) -> Response:
    """A vendored Swagger UI file named in the manifest; 404 for any other name."""
    found = asset(name)
    if found is None:
        raise HTTPException(404, f"no such Swagger UI file: {name[:100]!r}")
    etag = f'"{found.sha256}"'
    headers = {"ETag": etag, "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}
    if found.gzipped is not None:
        headers["Vary"] = "Accept-Encoding"
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    if found.gzipped is not None and accepts_gzip(request):
        headers["Content-Encoding"] = "gzip"
        return Response(found.gzipped, media_type=found.content_type, headers=headers)
    return Response(found.body, media_type=found.content_type, headers=headers)
