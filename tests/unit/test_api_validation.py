"""The 422 body builder: whatever a client sent, the echo is strict JSON, UTF-8 encodable and small."""

from __future__ import annotations

import json
import math
from typing import Any

from services.api.http.validation import MAX_ERRORS, safe_input, safe_text, safe_value, validation_body


def strict_json(value: Any) -> str:
    """`value` as JSON, refusing NaN/Infinity, and checked to encode as UTF-8."""
    text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    text.encode("utf-8")
    return text


def test_non_finite_floats_become_strings() -> None:
    """NaN and ±Infinity are echoed as the JSON words Python's parser accepted."""
    assert safe_value(math.nan) == "NaN"
    assert safe_value(math.inf) == "Infinity"
    assert safe_value(-math.inf) == "-Infinity"
    assert safe_value(1.5) == 1.5
    assert safe_value(10**40) == str(10**40)
    assert safe_value(True) is True


def test_strings_are_escaped_and_clipped_with_their_length() -> None:
    """A lone surrogate is escaped; a long string keeps 100 characters and says how long it was."""
    assert safe_text("a\ud800b") == "a\\ud800b"
    clipped = safe_text("é" * 5_000)
    assert clipped.startswith("é" * 100)
    assert clipped.endswith("(5000 characters)")
    assert len(clipped) < 130
    assert safe_value(b"\xff\xfeab") == "\\xff\\xfeab"


def test_containers_are_clipped_and_summarised() -> None:
    """Objects and lists keep 10 entries, two levels deep; a large result becomes clipped JSON text."""
    big = {f"k{n}": [list(range(50))] for n in range(30)}
    safe: Any = safe_value(big)
    assert isinstance(safe, dict)
    assert len(safe) == 11
    assert safe["…"] == "20 more keys"
    assert safe["k0"] == ["[array of 50 items]"]
    items: Any = safe_value(list(range(25)))
    assert items[-1] == "… 15 more items"
    echoed = safe_input({f"key{n}": "v" * 100 for n in range(10)})
    assert isinstance(echoed, str)
    assert len(echoed) < 1_100
    strict_json(echoed)


def test_validation_body_is_strict_json_and_capped() -> None:
    """Surrogates in loc, exceptions in ctx and hundreds of errors still give a small strict-JSON body."""
    errors = [
        {
            "type": "value_error",
            "loc": ("body", "\udc00" * 3, 0),
            "msg": "Value error, bad",
            "input": {"t": math.nan, "c": "\ud800" * 1_000},
            "ctx": {"error": ValueError("bad \ud800"), "gt": 0.0, "le": math.inf},
        }
    ] * 300
    text = strict_json(validation_body(errors))
    assert len(text) < 20_000
    body: Any = json.loads(text)
    assert len(body["detail"]) == MAX_ERRORS
    assert body["errors_omitted"] == 300 - MAX_ERRORS
    first = body["detail"][0]
    assert first["loc"] == ["body", "\\udc00" * 3, 0]
    assert first["ctx"] == {"error": "bad \\ud800", "gt": 0.0, "le": "Infinity"}
    assert first["input"]["t"] == "NaN"
    assert "(1000 characters)" in first["input"]["c"]
