"""``/agent/...``: what a host pulls to install itself (no API key: the host has none).

    curl -fsS http://API/agent/install.sh | WARLOCK_TOKEN=... sh   # or the token on the script's stdin

The token reaches the script on standard input or in ``WARLOCK_TOKEN``, never in its arguments or a URL:
these endpoints take no token and serve the same bytes to everyone. The wheel carries its SHA-256 in the
``X-Warlock-Sha256`` header (and its real file name, which pip needs, in ``X-Warlock-Wheel-Name``), for the
script's ``WARLOCK_WHEEL`` / ``WARLOCK_WHEEL_SHA256``: it checks the hash before changing anything.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

from fastapi import APIRouter, Response

from services.api.deps import StateDep
from services.api.errors import DependencyUnavailable, NotFound

log = logging.getLogger(__name__)

router = APIRouter(prefix="/agent", tags=["agent downloads"])

WHEEL_ALIAS = "warlock_agent.whl"
SHA_HEADER = "X-Warlock-Sha256"
NAME_HEADER = "X-Warlock-Wheel-Name"  # pip needs the real file name: save it under this name


def install_module() -> ModuleType:
    """``shared.install``, imported on first use."""
    return importlib.import_module("shared.install")


def _script(name: str) -> bytes:
    """The named script from ``shared.install`` (loaded lazily: it ships separately)."""
    try:
        text = install_module().script(name)
    except (ImportError, AttributeError, OSError, KeyError, ValueError) as exc:
        log.warning("install script %s unavailable: %s", name, type(exc).__name__)
        raise DependencyUnavailable(f"{name} is not available in this build of the API") from exc
    return text if isinstance(text, bytes) else str(text).encode()


@router.get(
    "/install.sh",
    response_class=Response,
    responses={200: {"content": {"text/x-shellscript": {}}}, 503: {"description": "no script in this build"}},
)
async def install_script() -> Response:
    """The pull installer; give it the token on stdin or in WARLOCK_TOKEN, never in a URL."""
    return Response(_script("install.sh"), media_type="text/x-shellscript")


@router.get(
    "/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": f"the wheel; {SHA_HEADER} header"},
        404: {"description": "not the agent wheel"},
        503: {"description": "the wheel could not be read or built"},
    },
)
async def agent_wheel(name: str, state: StateDep) -> Response:
    """The agent wheel, as ``warlock_agent.whl`` or by its real file name, with its SHA-256 in a header.

    The name is checked before anything is read or built: any other name is 404 at no cost.
    """
    wheels = state.lifecycle.wheels
    expected = wheels.file_name()
    if name not in (WHEEL_ALIAS, expected):
        raise NotFound(f"unknown file {name[:100]!r}; this API serves {expected} (or {WHEEL_ALIAS})")
    wheel = await wheels.get()
    headers = {
        SHA_HEADER: wheel.sha256,
        NAME_HEADER: wheel.name,
        "Content-Disposition": f'attachment; filename="{wheel.name}"',
    }
    return Response(wheel.data, media_type="application/octet-stream", headers=headers)
