"""Request bodies as JSON, inside the configured depth and number-size limits."""
from __future__ import annotations

import orjson

from tidegate.core.http.http11 import HttpError, Request
from tidegate.ext import jsonguard

_JSON_TYPES = (b"application/json", b"application/x-ndjson", b"text/plain")
_JSON_TYPES_CI = {t: True for t in _JSON_TYPES}


def parse_json(req: Request, limits: dict):
    """Decode req.body or raise a 400/415 that says what is wrong."""
    body = checked_body(req, limits)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HttpError(400, f"invalid JSON: {e}", "invalid_json") from None
    except RecursionError:  # belt and braces: the scan above should make this unreachable
        raise HttpError(400, "JSON nested too deeply", "json_too_deep") from None


def checked_body(req: Request, limits: dict) -> bytes:
    """req.body once its content type, depth and number sizes are within limits (JSON or NDJSON)."""
    ctype = req.headers.get(b"content-type")
    if ctype is not None and ctype not in _JSON_TYPES_CI and not ctype.split(b";", 1)[0].strip().lower().startswith(
            _JSON_TYPES):
        raise HttpError(415, f"Content-Type must be application/json, got {ctype.decode('latin-1')[:100]}",
                        "unsupported_media_type")
    body = req.body
    if not body:
        raise HttpError(400, "request body is empty; expected JSON", "invalid_json")
    depth, num = limits["max_json_depth"], limits["max_json_number_chars"]
    code, offset = jsonguard.scan(body, depth, num)
    if code == jsonguard.TOO_DEEP:
        raise HttpError(400, f"JSON nested deeper than {depth} levels (at byte {offset})", "json_too_deep")
    if code == jsonguard.NUMBER_TOO_LONG:
        raise HttpError(400, f"JSON number longer than {num} characters (at byte {offset})", "json_number_too_long")
    return body
