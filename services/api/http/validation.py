"""The 422 answer to a request that did not validate, built so that any rejected input can be echoed.

FastAPI's own handler passes each error's ``input`` to the JSON encoder as it came: a ``NaN`` or
``Infinity`` (which Python's JSON parser accepts) or a lone surrogate (``"\\ud800"``) cannot be encoded, so
a rejected body became a 500 with a traceback, and a 10 MB field came back as a 10 MB error body. Here
every value is made JSON-safe and small first:

- strings: lone surrogates escaped (``\\ud800``), clipped to `MAX_TEXT` characters with the length noted
- floats: ``NaN``, ``Infinity`` and ``-Infinity`` as strings; very long integers as clipped strings
- lists and objects: at most `MAX_ITEMS` entries, `MAX_DEPTH` levels deep, then summarised; an input whose
  JSON is still over `MAX_INPUT_CHARS` is replaced by its clipped JSON text
- ``ctx`` values (e.g. a validator's ``ValueError``) as strings; at most `MAX_ERRORS` errors, the number
  left out in ``errors_omitted``
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

MAX_ERRORS = 20
MAX_TEXT = 100
MAX_ITEMS = 10
MAX_DEPTH = 2
MAX_INPUT_CHARS = 1000
MAX_MSG = 500

Json = None | bool | int | float | str | list["Json"] | dict[str, "Json"]


def safe_text(text: str, limit: int = MAX_TEXT) -> str:
    """`text` with lone surrogates escaped, clipped to `limit` characters with its length noted."""
    if len(text) > limit:
        text = f"{text[:limit]}… ({len(text)} characters)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def safe_value(value: Any, depth: int = 0) -> Json:
    """`value` as small JSON-safe data (see the module docstring)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 10**18 else safe_text(str(value))
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bytes | bytearray):
        return safe_text(bytes(value[: MAX_TEXT * 4]).decode("utf-8", "backslashreplace"))
    if isinstance(value, Mapping):
        if depth >= MAX_DEPTH:
            return f"{{object of {len(value)} keys}}"
        out: dict[str, Json] = {}
        for n, (k, v) in enumerate(value.items()):
            if n == MAX_ITEMS:
                out["…"] = f"{len(value) - MAX_ITEMS} more keys"
                break
            out[safe_text(str(k))] = safe_value(v, depth + 1)
        return out
    if isinstance(value, Sequence):
        if depth >= MAX_DEPTH:
            return f"[array of {len(value)} items]"
        items = [safe_value(v, depth + 1) for v in value[:MAX_ITEMS]]
        if len(value) > MAX_ITEMS:
            items.append(f"… {len(value) - MAX_ITEMS} more items")
        return items
    return safe_text(f"{type(value).__name__}: {value}")


def safe_input(value: Any) -> Json:
    """A rejected input as echoed in a 422: `safe_value`, and its JSON text clipped when still large."""
    safe = safe_value(value)
    if isinstance(safe, dict | list):
        text = json.dumps(safe, ensure_ascii=False)
        if len(text) > MAX_INPUT_CHARS:
            return safe_text(text, MAX_INPUT_CHARS)
    return safe


def safe_error(error: Mapping[str, Any]) -> dict[str, Json]:
    """One validation error as ``{loc, msg, type, input?, ctx?}``, every value JSON-safe and small."""
    loc: list[Json] = [p if isinstance(p, int) else safe_text(str(p)) for p in error.get("loc", ())]
    out: dict[str, Json] = {
        "loc": loc,
        "msg": safe_text(str(error.get("msg", "")), MAX_MSG),
        "type": safe_text(str(error.get("type", "")), MAX_TEXT),
    }
    if "input" in error:
        out["input"] = safe_input(error["input"])
    ctx = error.get("ctx")
    if isinstance(ctx, Mapping) and ctx:
        out["ctx"] = {
            safe_text(str(k)): safe_value(v) if isinstance(v, bool | int | float | str) else safe_text(str(v))
            for k, v in list(ctx.items())[:MAX_ITEMS]
        }
    return out


def validation_body(errors: Sequence[Mapping[str, Any]]) -> dict[str, Json]:
    """The 422 body: ``{"detail": [error, ...]}``, plus ``errors_omitted`` past `MAX_ERRORS`."""
    body: dict[str, Json] = {"detail": [safe_error(e) for e in errors[:MAX_ERRORS]]}
    if len(errors) > MAX_ERRORS:
        body["errors_omitted"] = len(errors) - MAX_ERRORS
    return body


async def request_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    """FastAPI handler for `RequestValidationError`: 422 with `validation_body`."""
    assert isinstance(exc, RequestValidationError)
    return JSONResponse(validation_body(exc.errors()), status_code=422)
